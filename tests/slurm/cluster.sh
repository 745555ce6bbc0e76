#!/usr/bin/env bash
# A single-node Slurm on localhost for the workflow's Slurm test: `cluster.sh start` / `cluster.sh stop`.
# Needs root and Debian's slurmctld slurmd slurm-client munge (installed by .ci/run). Everything it
# starts is recorded in pid files under $QV_SLURM_STATE and stopped by `cluster.sh stop`.
# Partitions "cpu" (default) and "gpu" match profiles/slurm/config.yaml. The daemons listen on ports 6817-6818; the test only talks to localhost.
set -euo pipefail
STATE=${QV_SLURM_STATE:-/tmp/qvlib-slurm}
CONF=/etc/slurm/slurm.conf

stop() {
  command -v scancel >/dev/null && scancel --user=root >/dev/null 2>&1 || true
  for name in slurmd slurmctld munged; do
    pidfile="$STATE/$name.pid"
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  # job steps started by slurmd (slurmstepd) end with their daemon; make sure none is left
  pkill -f "slurmstepd" 2>/dev/null || true
}

start() {
  for tool in slurmctld slurmd munged sinfo; do
    command -v "$tool" >/dev/null || { echo "cluster.sh: $tool not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 3; }
  done
  stop
  rm -rf "$STATE"
  mkdir -p "$STATE"/{munge-key,munge-run,spool/ctld,spool/d,log} /etc/slurm
  chmod 700 "$STATE/munge-key"
  chmod 755 "$STATE" "$STATE/munge-run"
  head -c 1024 /dev/urandom > "$STATE/munge-key/munge.key"
  chmod 400 "$STATE/munge-key/munge.key"
  munged --force --key-file="$STATE/munge-key/munge.key" --socket="$STATE/munge-run/munge.socket" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge.seed"
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cpus=$(getconf _NPROCESSORS_ONLN)
  cat > "$CONF" <<CONF
ClusterName=qvlib-test
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge-run/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
GresTypes=gpu
NodeName=localhost CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
CONF
  # Fake GPUs: enough for Slurm to hand out --gpus and set CUDA_VISIBLE_DEVICES.
  echo "Name=gpu File=/dev/tty[0-1]" > /etc/slurm/gres.conf
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N localhost
  for _ in $(seq 100); do
    if sinfo -h -o "%t" 2>/dev/null | grep -qx "idle"; then echo "cluster.sh: slurm up ($cpus CPUs, ${mem} MB)"; return 0; fi
    sleep 0.2
  done
  echo "cluster.sh: the node did not become idle" >&2
  sinfo >&2 || true
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  stop
  exit 4
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
