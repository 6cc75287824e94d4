#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests and `make slurm-submit`.
#
#   launch/slurm/local-cluster.sh up       install (apt, when missing), configure, start; idempotent
#   launch/slurm/local-cluster.sh down     stop the daemons this script started
#   launch/slurm/local-cluster.sh status   what is running, and the node's state
#
# Needs root (packages, /etc/slurm, daemons). No systemd is assumed: the daemons are started by
# hand and stopped by SIGTERM to the pid in each daemon's pidfile -- never by process name.
# Environment: SLURM_LOCAL_PARTITION (default: debug), SLURM_LOCAL_NODE (default: short hostname).
set -euo pipefail

PARTITION=${SLURM_LOCAL_PARTITION:-debug}
NODE=${SLURM_LOCAL_NODE:-$(hostname -s)}
CONF=/etc/slurm/slurm.conf
RUN_DIR=/run/slurm
PIDS=("/run/munge/munged.pid" "$RUN_DIR/slurmctld.pid" "$RUN_DIR/slurmd.pid")

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the pid in the file runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is missing; install slurmctld, slurmd, slurm-client and munge"
  say "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
  mkdir -p /etc/slurm /var/lib/slurm/ctld /var/lib/slurm/d /var/log/slurm "$RUN_DIR"
  # The node line comes from slurmd's own view of the hardware (CPUs, memory), minus the uptime.
  local node_line
  node_line=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+/NodeName=$NODE/; s/ UpTime=.*//")
  local wanted
  wanted=$(cat <<EOF
# Written by launch/slurm/local-cluster.sh: a single-node test cluster on localhost.
ClusterName=ddpseq
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/lib/slurm/ctld
SlurmdSpoolDir=/var/lib/slurm/d
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
  if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$wanted" ]; then
    printf '%s\n' "$wanted" > "$CONF"
    say "wrote $CONF"
  fi
}

start_munge() {
  alive /run/munge/munged.pid && return
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --force
}

wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2
  shift 2
  for _ in $(seq 1 $((limit * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not happen within ${limit}s (logs: /var/log/slurm/)"
}

node_ready() {
  local state
  state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -n1)
  [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]
}

up() {
  [ "$(id -u)" = 0 ] || die "needs root (packages, /etc/slurm, daemons)"
  install_packages
  write_config
  start_munge
  alive "$RUN_DIR/slurmctld.pid" || /usr/sbin/slurmctld -i
  wait_until 30 "slurmctld answering" scontrol ping
  alive "$RUN_DIR/slurmd.pid" || /usr/sbin/slurmd -N "$NODE"
  wait_until 60 "node $NODE idle" node_ready
  say "up: partition $PARTITION, node $NODE ($(sinfo -h -n "$NODE" -o '%c CPUs, %t'))"
}

down() {
  local pidfile pid
  # slurmd first, munge last: the controller still authenticates the node while it leaves.
  for pidfile in "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid" /run/munge/munged.pid; do
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill -TERM "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && die "pid $pid ($pidfile) did not stop within 10s"
    fi
  done
  say "down"
}

status() {
  local pidfile running=0
  for pidfile in "${PIDS[@]}"; do
    if alive "$pidfile"; then
      say "$(basename "$pidfile" .pid): running (pid $(cat "$pidfile"))"
      running=$((running + 1))
    else
      say "$(basename "$pidfile" .pid): stopped"
    fi
  done
  if [ "$running" = 3 ]; then
    sinfo
  fi
  [ "$running" = 3 ]
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up | down | status" >&2; exit 2 ;;
esac
