#!/bin/bash
# A one-node Slurm cluster on localhost for the tests: munge, slurmctld, slurmd, all state in DIR.
#   tests/slurm/cluster.sh start DIR    (prints "export SLURM_CONF=DIR/slurm.conf" when ready)
#   tests/slurm/cluster.sh stop DIR
# No cgroups (proctrack/linuxproc, task/none); the node declares 8 CPUs whatever the machine
# has (config_overrides), so 3-rank jobs fit on a 2-core VM. Needs root and Debian's
# slurmctld, slurmd and munge packages.
set -euo pipefail
cmd=$1 dir=$(realpath -m "$2")
host=$(hostname -s)
case "$cmd" in
start)
    mkdir -p "$dir"/{state,spool,log}
    if ! munge -n >/dev/null 2>&1; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
        runuser -u munge -- /usr/sbin/munged
    fi
    cat > "$dir/slurm.conf" <<CONF
ClusterName=lldisttest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$((16817 + RANDOM % 1000))
SlurmdPort=$((17818 + RANDOM % 1000))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=300
SchedulerType=sched/backfill
NodeName=$host CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -q idle; then
            echo "export SLURM_CONF=$SLURM_CONF"
            exit 0
        fi
        sleep 0.5
    done
    echo "slurm did not come up; logs in $dir/log" >&2
    tail -20 "$dir/log/"*.log >&2 || true
    exit 1
    ;;
stop)
    # end every job still running (a failed test may leave one), then the daemons
    SLURM_CONF=$dir/slurm.conf scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    SLURM_CONF=$dir/slurm.conf scancel --user="$(id -un)" 2>/dev/null || true
    sleep 1
    for p in slurmd slurmctld; do
        [ -f "$dir/$p.pid" ] && kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
    done
    sleep 1
    ;;
esac
