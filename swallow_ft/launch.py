"""Local multi-rank runs: run_clm.py starts itself again under torchrun, one rank per slot, and stays as the parent
that turns a Ctrl-C or SIGTERM into a preemption of the ranks."""

import logging
import os
import signal
import subprocess
import sys
from typing import List, Sequence

from swallow_ft.local_core import abort_message

logger = logging.getLogger(__name__)

LAUNCHED_ENV = "SWALLOW_FT_LAUNCHED"  # set by our torchrun re-launch, so children do not launch again
PREEMPT_FILE_ENV = "SWALLOW_FT_PREEMPT_FILE"  # the launcher creates this file to preempt its ranks
PORTS_ENV = "SWALLOW_FT_DET_PORTS"  # free ports for Determined's broadcast server, so two local runs can coexist

# torchrun, but a rank that stopped ends it in one line, not in torchrun's traceback and report: exit 2 (a UserError,
# which rank 0 has printed) quietly, any other failure as the rank, exit code or signal and where its output is.
TORCHRUN = """
import logging, sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
try:
    main(sys.argv[1:])
except ChildFailedError as failed:
    rank, first = failed.get_first_failure()
    if first.exitcode != 2:
        how = f"signal {first.signal_name()}" if first.exitcode < 0 else f"exit code {first.exitcode}"
        print(f"error: rank {rank} stopped with {how}; its output is above", file=sys.stderr)
    sys.exit(first.exitcode if 0 < first.exitcode < 128 else 1)
"""


def relaunch(job, argv: Sequence[str], script: str) -> int:
    """Run this script again under torchrun with slots_per_trial processes; return its exit code.

    SIGTERM/Ctrl-C here become a preemption of the ranks (through a flag file they poll every
    step); a second Ctrl-C kills them. torchrun runs in its own session so that a terminal's
    Ctrl-C reaches only us, and it is told to die with us if we are killed outright.
    """
    nproc = job.experiment.slots_per_trial if job.experiment else 1
    cmd = [sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc_per_node={nproc}",
           script, *without_fresh(argv)]
    preempt_file = job.run_dir / "output" / ".preempt"
    preempt_file.parent.mkdir(parents=True, exist_ok=True)
    logger.info("launching %d processes: torchrun %s", nproc, " ".join(cmd[3:]))
    env = {**os.environ, LAUNCHED_ENV: "1", PREEMPT_FILE_ENV: str(preempt_file), PORTS_ENV: _free_ports(2)}
    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)

    aborted = []

    def preempt(signum, _frame):
        if signum == signal.SIGINT and preempt_file.exists():
            os.killpg(child.pid, signal.SIGKILL)
            aborted.append(signum)
            return
        preempt_file.touch()
        logger.warning("%s received: the ranks save a checkpoint at the next step boundary, then exit "
                       "(press Ctrl-C again to abort without saving)", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, preempt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
        if aborted:
            print(abort_message(job.registry_path), file=sys.stderr, flush=True)
            return 128 + signal.SIGINT
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def without_fresh(argv: Sequence[str]) -> List[str]:
    """run_clm.py's arguments less --fresh, which the first process has already acted on: the ranks it starts, and a
    rerun that resumes, must not start over."""
    return [arg for arg in argv if arg != "--fresh"]


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: get signum when the parent dies (elsewhere a killed launcher leaves its children running)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signum)


def _free_ports(count: int) -> str:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = ",".join(str(s.getsockname()[1]) for s in sockets)
    for s in sockets:
        s.close()
    return ports
