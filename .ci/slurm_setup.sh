#!/usr/bin/env bash
# Starts a one-node Slurm cluster on loopback for the Slurm integration tests (tests/integration/test_slurm.py).
# Installs slurm-wlm + munge with apt-get if missing, writes a minimal slurm.conf for this host, starts munged,
# slurmctld and slurmd (as root) and waits until `sinfo` shows the node idle. Idempotent: a running, idle
# cluster is left alone. When it cannot (no root, no apt, a daemon will not start) it prints one line and
# exits 0, and the Slurm tests skip with a reason.
set -uo pipefail

say_skip() {
    echo "slurm_setup: $1; the Slurm tests will skip"
    exit 0
}

if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
    echo "slurm_setup: a Slurm node is already idle"
    exit 0
fi
[ "$(id -u)" = 0 ] || say_skip "not root"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || say_skip "slurmctld/munged missing and no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq slurm-wlm munge >/dev/null \
        || say_skip "apt-get install slurm-wlm munge failed"
fi

NODE="$(hostname -s)"
CPUS="$(nproc)"
CONF_DIR=/etc/slurm
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/log/munge
# Linux process tracking and no task plugin: cgroups are not available inside every CI container.
# A requeued job waits cred_expire seconds before it may start again; Slurm's default, 120 s, would add two
# idle minutes to every requeue test (SLURM_CRED_EXPIRE_S overrides). The scheduler looks again every 5 s.
cat >"$CONF_DIR/slurm.conf" <<CONF
ClusterName=tandem
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${SLURM_CRED_EXPIRE_S:-10}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmdTimeout=300
InactiveLimit=0
KillWait=30
MinJobAge=300
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if command -v runuser >/dev/null && id munge >/dev/null 2>&1; then
        runuser -u munge -- munged || say_skip "munged did not start"
    else
        munged --force || say_skip "munged did not start"
    fi
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || say_skip "munge does not answer"
fi

pgrep -x slurmctld >/dev/null || slurmctld || say_skip "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || say_skip "slurmd did not start (see /var/log/slurm/slurmd.log)"

for _ in $(seq 60); do
    state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null)"
    case "$state" in
        idle*|mixed*|allocated*) echo "slurm_setup: node $NODE is $state ($CPUS CPUs)"; exit 0 ;;
        down*|drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 ;;
    esac
    sleep 1
done
say_skip "node $NODE did not become idle (state: ${state:-unknown})"
