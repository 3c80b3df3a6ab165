#!/usr/bin/env bash
# The real SLURM test: run the workflow through profiles/slurm on a single-node SLURM
# cluster brought up on this machine, and check what was submitted and what came out.
#
#   sudo bash scripts/slurm_test.sh [TARGET ...]      (CI runs it as root)
#
# TARGETs are paths relative to the results root (default: tests/slurm/targets.txt).
# It
#   1. installs Debian's slurmctld, slurmd, slurm-client, munge, slurmdbd and mariadb-server
#      when missing (without letting the packages start their system services);
#   2. brings up a PRIVATE cluster: munged, mariadbd, slurmdbd, slurmctld and slurmd with
#      their own configs, keys, sockets, state and free ports, all inside one temporary
#      directory, found through SLURM_CONF. An existing /etc/slurm, /etc/munge, MariaDB or
#      SLURM cluster is never read, written, reused or stopped. The node has a fake GPU
#      (GresTypes=gpu, gres.conf AutoDetect=off, File= a symlink to /dev/null);
#   3. runs the targets on tests/slurm/tiny_config.yaml through `snakemake --profile
#      profiles/slurm`, and again locally (--cores 2) in another directory;
#   4. checks that GPU rules were submitted with --gpus=1, got gres/gpu=1 from SLURM and ran
#      in the GPU partition (chosen by the plugin from profiles/slurm/partitions.example.yaml),
#      CPU rules none of these, and that the outputs equal the local run's
#      (tests/slurm/checks.py);
#   5. runs tests/slurm/failing.smk through the profile: the run must fail, show the rule's
#      log, and have retried the job with runtime scaled by attempt; and an SAE whose k no
#      layer holds (tests/slurm/bad_sae.yaml): it must fail in the local check_sae job, with
#      nothing submitted to SLURM;
#   6. tears down what it started (and only that), also on error or interrupt.
# Every snakemake call is wrapped in `timeout -k` (without a working sacct the plugin would
# wait forever). Safe to run twice, also at the same time: nothing is shared between runs.
#
# Environment: DIFFATLAS_SLURM_RUN_TIMEOUT (seconds per snakemake run, default 480),
# DIFFATLAS_SLURM_KEEP=1 (keep the temporary directory, with every log, for inspection),
# DIFFATLAS_SLURM_HOLD=1 (bring the cluster up, print how to use it, wait for Ctrl-C),
# PYTHON (default .venv/bin/python).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RUN_TIMEOUT=${DIFFATLAS_SLURM_RUN_TIMEOUT:-480}
KEEP=${DIFFATLAS_SLURM_KEEP:-0}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
PATH="$(dirname "$PY"):$PATH"
export PATH
TINY_CONFIG=${DIFFATLAS_SLURM_CONFIG:-$ROOT/tests/slurm/tiny_config.yaml}
SNAKEFILE=${DIFFATLAS_SLURM_SNAKEFILE:-$ROOT/Snakefile}
PARTITIONS=$ROOT/profiles/slurm/partitions.example.yaml
NODE=dnode            # the node's name inside the private cluster
CLUSTER=diffatlas     # the private cluster's name in its own accounting database
SECONDS=0

log() { printf '[slurm_test %4ss] %s\n' "$SECONDS" "$*"; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root: it installs packages and starts SLURM daemons"

if [ $# -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(grep -v -e '^\s*#' -e '^\s*$' "$ROOT/tests/slurm/targets.txt")
fi

# ---------------------------------------------------------------- teardown (set up first)
T=""                  # the private directory; everything this run creates lives in it
C=""                  # the cluster's part of it
STARTED=()            # "name pidfile" of each daemon this run started, in start order
OUR_POLICY_RC=""      # set when this run created /usr/sbin/policy-rc.d

stop_pid() {          # stop_pid PID NAME: TERM, wait up to 15 s, then KILL
    local pid=$1 name=$2 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    log "teardown: $name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

names() {             # names DIR PID: does the process name DIR (command line or environment)?
    local text
    text=$({ tr '\0' '\n' <"/proc/$2/cmdline"; tr '\0' '\n' <"/proc/$2/environ"; } 2>/dev/null)
    [[ $text == *"$1"* ]]
}

ours() { [ -n "$T" ] && names "$T" "$1"; }

sweep() {             # sweep DIR: stop every process that names DIR; TERM, 5 s, then KILL
    local dir=$1 pid i left=() alive
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        { [ "$pid" = $$ ] || [ "$pid" = "$BASHPID" ]; } && continue
        names "$dir" "$pid" && left+=("$pid") && kill -TERM "$pid" 2>/dev/null
    done
    for i in $(seq 10); do
        alive=()
        for pid in "${left[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        left=("${alive[@]}")
        [ ${#left[@]} = 0 ] && return 0
        sleep 0.5
    done
    for pid in "${left[@]}"; do
        log "teardown: $(cat /proc/$pid/comm 2>/dev/null) (pid $pid) ignored SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    done
}

teardown() {
    local rc=$? entry name pidfile pid i
    set +e
    trap - EXIT INT TERM
    if [ -n "$C" ] && [ -S "$C/run/munge.socket" ] && [ -f "$C/run/slurmctld.pid" ]; then
        # Cancel what is left in OUR cluster (every job in it is this run's), and let the
        # job steps finish before their slurmd goes.
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null
        for i in $(seq 20); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        read -r name pidfile <<<"${STARTED[i]}"
        pid=$(cat "$pidfile" 2>/dev/null)
        if [ -n "$pid" ] && ours "$pid"; then stop_pid "$pid" "$name"; fi
    done
    # Stragglers (a job step, a run cut short, a daemon that died before writing its pid
    # file): only processes whose command line or environment names this run's directory.
    [ -n "$T" ] && sweep "$T"
    [ -n "$OUR_POLICY_RC" ] && rm -f "$OUR_POLICY_RC"
    if [ -n "$T" ]; then
        if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
            log "kept $T (logs: $T/*.log, daemons: $T/cluster/log)"
        else
            rm -rf "$T"
        fi
    fi
    log "teardown done (exit $rc, ${SECONDS}s in all)"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- 1. packages
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"ok installed"* ]] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # Keep the packages' maintainer scripts from starting system-wide munge, MariaDB
        # or SLURM services: this test runs its own, private ones.
        OUR_POLICY_RC=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$OUR_POLICY_RC"
        chmod 755 "$OUR_POLICY_RC"
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    [ -n "$OUR_POLICY_RC" ] && rm -f "$OUR_POLICY_RC" && OUR_POLICY_RC=""
    log "installed"
fi

# ---------------------------------------------------------------- 2. the private cluster
# A run killed outright (SIGKILL) cannot tear down, and its daemons would run on. Each run
# writes its own pid into its directory; a directory whose run is gone (no live
# slurm_test.sh with that pid) gets the processes that name it stopped here.
for old in /tmp/diffatlas-slurm.*; do
    [ -f "$old/owner.pid" ] || continue
    owner=$(cat "$old/owner.pid")
    if [[ $({ tr '\0' ' ' <"/proc/$owner/cmdline"; } 2>/dev/null) != *slurm_test.sh* ]]; then
        log "stopping what is left of an earlier, killed run in $old"
        sweep "$old"
        rm -f "$old/owner.pid"
    fi
done
T=$(mktemp -d /tmp/diffatlas-slurm.XXXXXX)
chmod 755 "$T"        # munged insists that its socket's directories be world-searchable
echo $$ >"$T/owner.pid"
C=$T/cluster
# The tiny model is built while the cluster comes up (it is the slowest step on a busy CPU).
diffatlas make-tiny-model pixel "$T/tiny_model" >"$T/tiny_model.log" 2>&1 &
TINY_PID=$!
mkdir -p -m 755 "$C" "$C"/{etc,log,state,spool,dev,mysql,run}
install -d -m 700 "$C/munge"
log "private cluster in $C"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
MYSQL_PORT=$(free_port); DBD_PORT=$(free_port); CTLD_PORT=$(free_port); SLURMD_PORT=$(free_port)
CPUS=8                # the fake node's CPUs (SlurmdParameters=config_overrides allows more than
MEM_MB=64000          # the machine has: nothing is enforced, rules' requests just have to fit)
DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')

wait_for() {          # wait_for SECONDS WHAT LOGFILE COMMAND...
    local secs=$1 what=$2 logfile=$3 i
    shift 3
    for i in $(seq $((secs * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    log "$what did not come up within ${secs}s; last lines of $logfile:"
    tail -n 30 "$logfile" 2>/dev/null | sed 's/^/    /'
    die "$what did not start"
}

started() { STARTED+=("$1 $2"); }

# munge: own key, own socket.
dd if=/dev/urandom of="$C/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$C/munge/munge.key"
MUNGE_SOCKET=$C/run/munge.socket
munged --socket="$MUNGE_SOCKET" --key-file="$C/munge/munge.key" \
    --pid-file="$C/run/munged.pid" --log-file="$C/log/munged.log" --seed-file="$C/munge/seed"
started munged "$C/run/munged.pid"
wait_for 15 munged "$C/log/munged.log" bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"

# MariaDB for slurmdbd: own data directory, socket and port; no /etc/mysql.
mariadb-install-db --no-defaults --datadir="$C/mysql/data" --user=root \
    --auth-root-authentication-method=normal --skip-test-db >"$C/log/mariadb-install.log" 2>&1 ||
    { tail -n 20 "$C/log/mariadb-install.log"; die "mariadb-install-db failed"; }
mariadbd --no-defaults --datadir="$C/mysql/data" --socket="$C/run/mysql.sock" \
    --port="$MYSQL_PORT" --bind-address=127.0.0.1 --pid-file="$C/run/mariadbd.pid" \
    --user=root --log-error="$C/log/mariadbd.log" --skip-log-bin \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 >/dev/null 2>&1 &
started mariadbd "$C/run/mariadbd.pid"
wait_for 30 mariadbd "$C/log/mariadbd.log" \
    mariadb-admin --no-defaults -S "$C/run/mysql.sock" -u root ping
mariadb --no-defaults -S "$C/run/mysql.sock" -u root -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

cat >"$C/etc/slurmdbd.conf" <<EOF
# Private to this test run (scripts/slurm_test.sh).
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$C/run/slurmdbd.pid
LogFile=$C/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$C/etc/slurmdbd.conf"

cat >"$C/etc/slurm.conf" <<EOF
# Private to this test run (scripts/slurm_test.sh): a one-node cluster on localhost.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$C/state
SlurmdSpoolDir=$C/spool/slurmd-%n
SlurmctldPidFile=$C/run/slurmctld.pid
SlurmdPidFile=$C/run/slurmd.pid
SlurmctldLogFile=$C/log/slurmctld.log
SlurmdLogFile=$C/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=500
# The fake GPU: a generic resource the scheduler counts; its device file is /dev/null.
GresTypes=gpu
# Accounting through slurmdbd, so that sacct (the plugin's status command) works.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# The munge socket for talking to slurmdbd (clients and slurmctld).
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
ReturnToService=2
# The node may claim more CPUs and memory than the machine has (nothing is enforced).
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
# Two partitions on the one node, named as in profiles/slurm/partitions.example.yaml: the
# plugin must send GPU jobs to "gpu" and the others to "cpu".
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
ln -s /dev/null "$C/dev/fakegpu0"
cat >"$C/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu File=$C/dev/fakegpu0
EOF
# Every SLURM command and daemon below (and the plugin's sbatch/sacct) reads this config;
# slurmdbd finds slurmdbd.conf next to it.
export SLURM_CONF=$C/etc/slurm.conf
# Inside a job the plugin's job step drops every SLURM_* variable, SLURM_CONF included,
# before it calls `srun`; on a real cluster srun then reads /etc/slurm/slurm.conf (or the
# configless cache). This private cluster has no config there, so jobs get an srun that is
# told where it is (the jobs inherit this PATH through sbatch --export=ALL).
mkdir -p "$C/bin"
printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$SLURM_CONF" "$(command -v srun)" >"$C/bin/srun"
chmod 755 "$C/bin/srun"
PATH=$C/bin:$PATH

slurmdbd
started slurmdbd "$C/run/slurmdbd.pid"
wait_for 30 slurmdbd "$C/log/slurmdbd.log" sacctmgr -n list cluster
# Register the cluster, an account and root as its user in the accounting database.
sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -i add account ci Cluster="$CLUSTER" Description=ci Organization=ci >/dev/null
sacctmgr -i add user root Account=ci Cluster="$CLUSTER" >/dev/null

slurmctld
started slurmctld "$C/run/slurmctld.pid"
wait_for 30 slurmctld "$C/log/slurmctld.log" bash -c "scontrol ping | grep -q UP"
slurmd -N "$NODE"
started slurmd "$C/run/slurmd.pid"
wait_for 30 slurmd "$C/log/slurmd.log" bash -c "sinfo -h -n $NODE -o %t | grep -qx idle"
log "cluster up: $(sinfo -h -o '%P %D %t %G' | tr '\n' ' ')"
if [ "${DIFFATLAS_SLURM_HOLD:-0}" = 1 ]; then
    log "holding the cluster; in another shell:  export SLURM_CONF=$SLURM_CONF PATH=$C/bin:\$PATH"
    log "Ctrl-C (or kill $$) tears it down"
    while true; do sleep 1; done
fi

# ---------------------------------------------------------------- 3. the workflow, twice
for wd in wf-slurm wf-local wf-fail; do mkdir -p "$T/$wd"; done
# Both runs see the repository's config.yaml overlaid by the tiny config, as a user would
# (`snakemake --configfile tests/slurm/tiny_config.yaml` from the repository root), and
# their own copy of the tiny model, so they share no file.
wait $TINY_PID || { cat "$T/tiny_model.log"; die "diffatlas make-tiny-model failed"; }
for wd in wf-slurm wf-local; do
    cp "$ROOT/config.yaml" "$T/$wd/config.yaml"
    cp -r "$T/tiny_model" "$T/$wd/tiny_model"
done

run_snakemake() {     # run_snakemake LOGFILE ARGS...: bounded by RUN_TIMEOUT
    local logfile=$1
    shift
    timeout -k 15 "$RUN_TIMEOUT" snakemake "$@" >"$logfile" 2>&1
}

check_run() {         # check_run NAME STATUS LOGFILE: die unless the run succeeded
    if [ "$2" = 124 ] || [ "$2" = 137 ]; then
        tail -n 40 "$3" | sed 's/^/    /'
        die "$1 ran past ${RUN_TIMEOUT}s and was stopped (log: $3)"
    elif [ "$2" != 0 ]; then
        tail -n 60 "$3" | sed 's/^/    /'
        die "$1 failed (exit $2; log: $3)"
    fi
    log "$1 done"
}

# Fast status checks for a tiny cluster; everything else comes from the profile.
FAST=(--slurm-init-seconds-before-status-checks 2 --latency-wait 5)
RESULT_TARGETS=("${TARGETS[@]/#/results/}")
log "targets: ${TARGETS[*]}"

# The three runs are independent (own directories, and SLURM jobs mostly wait on status
# checks), so they run side by side.
log "SLURM run (profiles/slurm), failing-rule run and local run (--cores 2)"
run_snakemake "$T/slurm_run.log" "${RESULT_TARGETS[@]}" -s "$SNAKEFILE" -d "$T/wf-slurm" \
    --profile "$ROOT/profiles/slurm" "${FAST[@]}" --verbose --configfile "$TINY_CONFIG" \
    --slurm-partition-config "$PARTITIONS" &
SLURM_PID=$!
run_snakemake "$T/fail_run.log" -s "$ROOT/tests/slurm/failing.smk" -d "$T/wf-fail" \
    --profile "$ROOT/profiles/slurm" "${FAST[@]}" &
FAIL_PID=$!
run_snakemake "$T/local_run.log" "${RESULT_TARGETS[@]}" -s "$SNAKEFILE" -d "$T/wf-local" \
    --cores 2 --configfile "$TINY_CONFIG" &
LOCAL_PID=$!
set +e
wait $SLURM_PID; SLURM_RC=$?
wait $FAIL_PID; FAIL_RC=$?
wait $LOCAL_PID; LOCAL_RC=$?
set -e
check_run "the SLURM run" "$SLURM_RC" "$T/slurm_run.log"
check_run "the local run" "$LOCAL_RC" "$T/local_run.log"
if [ "$FAIL_RC" = 124 ] || [ "$FAIL_RC" = 137 ]; then
    check_run "the failing-rule run" "$FAIL_RC" "$T/fail_run.log"
fi
if grep -q "workflow specific profile" "$T/slurm_run.log"; then
    log "WARNING: $(grep -m1 'workflow specific profile' "$T/slurm_run.log")"
    log "WARNING: its keys override profiles/slurm's (see profiles/slurm/README.md, section 6)"
fi

# ---------------------------------------------------------------- 4. checks
log "check: submissions (rules' resources vs sbatch options vs SLURM's accounting)"
"$PY" "$ROOT/tests/slurm/checks.py" submissions "$T/slurm_run.log" "$PARTITIONS" ||
    die "submissions do not match the rules' resources"
log "check: SLURM outputs vs local outputs"
"$PY" "$ROOT/tests/slurm/checks.py" compare "$T/wf-slurm/results" "$T/wf-local/results" ||
    die "SLURM outputs differ from the local run's"
log "check: a failing rule fails the run and its log is shown"
"$PY" "$ROOT/tests/slurm/checks.py" failure "$T/fail_run.log" "$FAIL_RC" ||
    die "the failing rule was not reported as it should be"

log "check: an SAE setting that cannot work fails before its GPU job is submitted"
# The SLURM run's store is there; only the SAE (check_sae, then train_sae) is left to run.
set +e
run_snakemake "$T/presubmit_run.log" results/sae/shapesworld/shapesworld/mid/t100/metrics.json \
    -s "$SNAKEFILE" -d "$T/wf-slurm" --profile "$ROOT/profiles/slurm" "${FAST[@]}" \
    --configfile "$TINY_CONFIG" "$ROOT/tests/slurm/bad_sae.yaml" --slurm-partition-config "$PARTITIONS"
PRESUBMIT_RC=$?
set -e
"$PY" "$ROOT/tests/slurm/checks.py" presubmit "$T/presubmit_run.log" "$PRESUBMIT_RC" ||
    die "a bad SAE setting was not stopped before submission"

log "PASS: the workflow runs through profiles/slurm on a real SLURM cluster"
