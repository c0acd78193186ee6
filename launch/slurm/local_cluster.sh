#!/bin/bash
# A real two-node Slurm cluster on this one machine, for trying the sbatch scripts without a cluster.
#
#   launch/slurm/local_cluster.sh up DIR     # install slurm-wlm + munge if missing (root), start, wait for idle
#   export SLURM_CONF=DIR/slurm.conf         # then sbatch/squeue/scontrol talk to it
#   launch/slurm/local_cluster.sh down DIR   # cancel its jobs, stop its daemons by their pid files
#
# Nodes n1 and n2 (one CPU each, slurmd ports 17001/17002, slurmctld on 17000) are two
# slurmd daemons on this host; `127.0.0.1 n1 n2` is added to /etc/hosts so that the node
# names resolve as they do on a real cluster. Everything else lives in DIR: slurm.conf,
# the munge key and socket, state and spool folders, pid files and logs. DIR must be
# reachable by the munge user (a folder under /tmp made for it works).
# Exit status: 0 up (or already up) / down, 2 usage, 3 Slurm cannot run here (not root, or
# slurm-wlm munge cannot be installed), 1 any other failure (the line printed says which,
# with the log to read).
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons live there

CANNOT_INSTALL=3
NODES=(n1 n2)

die() { echo "local_cluster: $1" >&2; exit "${2:-1}"; }

install_slurm() {
  command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends install slurm-wlm munge)
  echo "local_cluster: installing slurm-wlm munge" >&2
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" >"$DIR/apt.log" 2>&1 \
    || { apt-get -o DPkg::Lock::Timeout=600 -q update >>"$DIR/apt.log" 2>&1 \
         && DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"$DIR/apt.log" 2>&1; } \
    || die "apt-get install slurm-wlm munge failed (see $DIR/apt.log)" $CANNOT_INSTALL
}

# The pid in FILE if that process is alive and is COMMAND (a reused pid is another process).
live_pid() {
  local file=$1 command=$2 pid
  [ -s "$file" ] || return 1
  pid=$(<"$file")
  [ -r "/proc/$pid/comm" ] && [ "$(<"/proc/$pid/comm")" = "$command" ] && echo "$pid"
}

write_conf() {
  local host
  host=$(hostname -s)
  cat >"$DIR/slurm.conf" <<EOF
ClusterName=moeasr
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=17000
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool/%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to scontrol for an hour (there is no accounting database).
MinJobAge=3600
KillWait=5
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=1 State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  local m=$DIR/munge
  install -d -o munge -g munge -m 755 "$m"  # munged wants its socket folder open to all
  if [ ! -s "$m/munge.key" ]; then
    head -c 1024 /dev/urandom >"$m/munge.key"
    chown munge:munge "$m/munge.key"
    chmod 400 "$m/munge.key"
  fi
  runuser -u munge -- munged --socket="$m/munge.socket.2" --key-file="$m/munge.key" \
    --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
    || die "munged did not start (see $m/munged.log)"
}

wait_idle() {
  local i states
  for i in $(seq 60); do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$states" = "n1 idle n2 idle " ] && return
    sleep 1
  done
  die "nodes not idle after 60 s (sinfo: ${states:-no answer}; see $DIR/log)"
}

up() {
  [ "$(id -u)" = 0 ] \
    || die "a local cluster needs root (to install slurm-wlm munge, run slurmd, start munged as munge)" $CANNOT_INSTALL
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  export SLURM_CONF=$DIR/slurm.conf
  if live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    echo "local_cluster: already up ($SLURM_CONF)"
    return
  fi
  install_slurm
  local port
  for port in 17000 17001 17002; do
    ! (: <>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
      || die "port $port is in use (another local cluster up? run down on its DIR)"
  done
  getent hosts n1 >/dev/null && getent hosts n2 >/dev/null || echo "127.0.0.1 n1 n2" >>/etc/hosts
  chmod 755 "$DIR"
  runuser -u munge -- test -x "$DIR" || die "the munge user cannot reach $DIR: pick a folder it can enter"
  mkdir -p "$DIR/state" "$DIR/run" "$DIR/log" "${NODES[@]/#/$DIR/spool/}"
  write_conf
  start_munge
  slurmctld || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
  for node in "${NODES[@]}"; do
    slurmd -N "$node" || die "slurmd -N $node did not start (see $DIR/log/slurmd-$node.log)"
  done
  wait_idle
  echo "local_cluster: up, nodes n1 n2 idle; export SLURM_CONF=$SLURM_CONF"
}

# Send TERM to the daemons named by FILE:COMMAND pairs, wait for all to exit, KILL any left after 30 s.
stop() {
  local pids=() left pid entry i
  for entry in "$@"; do
    pid=$(live_pid "${entry%:*}" "${entry##*:}") && kill "$pid" && pids+=("$pid")
  done
  for i in $(seq 60); do
    left=()
    for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && left+=("$pid"); done
    [ ${#left[@]} = 0 ] && return 0
    sleep 0.5
  done
  kill -9 "${left[@]}" 2>/dev/null || true
}

down() {
  [ -d "$DIR" ] || die "no cluster folder $DIR"
  DIR=$(cd "$DIR" && pwd)
  export SLURM_CONF=$DIR/slurm.conf
  if live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    local jobs i
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086  # one argument per job id
      scancel $jobs || true
      for i in $(seq 60); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  local slurmds=()
  for node in "${NODES[@]}"; do slurmds+=("$DIR/run/slurmd-$node.pid:slurmd"); done
  stop "${slurmds[@]}"
  stop "$DIR/run/slurmctld.pid:slurmctld"
  stop "$DIR/munge/munged.pid:munged"
  echo "local_cluster: down"
}

[ $# = 2 ] || die "usage: local_cluster.sh up|down DIR" 2
DIR=$2
case $1 in
  up) up ;;
  down) down ;;
  *) die "usage: local_cluster.sh up|down DIR" 2 ;;
esac
