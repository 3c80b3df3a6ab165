# A one-rule workflow that fails on purpose: scripts/slurm_test.sh runs it through
# profiles/slurm to check that a failing job fails the run and that the rule's log is shown.
# (Not part of the diffatlas workflow.)


rule all:
    default_target: True
    input:
        "never.txt",


rule fail_on_purpose:
    output:
        "never.txt",
    log:
        "logs/fail_on_purpose.log",
    resources:
        mem_mb=200,
        runtime=lambda wc, attempt: 2 * attempt,
    shell:
        # The log gets one line naming the runtime of this attempt; the job then fails.
        "echo DIFFATLAS-SLURM-TEST runtime={resources.runtime} > {log}; exit 3"
