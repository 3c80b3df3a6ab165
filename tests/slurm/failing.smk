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
        "echo 'DIFFATLAS-SLURM-TEST: fail_on_purpose attempt {resources.runtime} writes this line to its log' > {log}; exit 3"
