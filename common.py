"""
The plumbing every script shares, so that the scripts read as what they do:
- the command line: bad input ends in one `error:` line on stderr and a non-zero exit code,
  before any long work (fail, ArgumentParser, check_args, check_device, check_out_dir);
- the device: the default one, mixed precision for it, a GPU's peak FLOP/s (MFU);
- training loops: Ctrl-C between steps (StopFlag), the EMA of the weights;
- several processes (torchrun, DDP): setup, stop flags every rank agrees on, gradients averaged
  and weights broadcast in flat buckets.
"""
import argparse
import atexit
import math
import os
import re
import signal

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# -----------------------------------------------------------------------------
# the command line


def fail(msg):
    """One line on stderr starting with `error:`, exit code 1, no traceback."""
    raise SystemExit(f"error: {msg}")


class HelpFormatter(argparse.HelpFormatter):
    """--help shows every flag's default: "(default: X)" after its text, unless the text already
    says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (a bad number, an unknown flag) are one `error:` line too, and
    whose --help shows the defaults."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        fail(f"{message} (see --help)")


def check_args(args, positive=(), nonneg=()):
    """Counts given on the command line: `positive` must be >= 1, `nonneg` >= 0 (None: the default
    is decided later). Names are argparse destinations (--max_steps -> max_steps)."""
    for names, lo in ((positive, 1), (nonneg, 0)):
        for k in names:
            v = getattr(args, k)
            if v is not None and not v >= lo:
                fail(f"--{k} must be {'at least 1' if lo else 'non-negative'}, got {v}")


def check_device(name):
    """--device: 'cpu', 'cuda' or 'cuda:N' that this machine has -> name; else one error line."""
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if not m:
        fail(f"--device {name}: use cpu, cuda or cuda:N")
    if name != "cpu" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if m.group(1) and int(m.group(1)) >= torch.cuda.device_count():
        fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


FILE_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".gif", ".png", ".jpg", ".json", ".jsonl", ".pt", ".txt")


def check_out_dir(path, flag="--out"):
    """--out is a folder (created if missing): not an existing file, nor a name that reads as a
    file (x.mp4: the scripts write several files into --out, under their own names)."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{flag} {path} is a file; {flag} names a folder")
    if not os.path.isdir(path) and path.lower().endswith(FILE_SUFFIXES):
        fail(f"{flag} {path} names a file; {flag} names a folder, into which the run writes its files under their "
             f"own names (e.g. {flag} {os.path.splitext(path)[0]})")
    return path


LOCK = ".lock"      # in an --out folder while a run writes there: the run's process id


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # another user's live process
        return True
    return True


def hold_out_dir(path, flag="--out"):
    """Make the --out folder and hold it for this process until it exits: a lock file with the
    process id, so that a second run given the same --out stops with one error line instead of
    overwriting the first one's files. A lock left by a process that is gone (killed) is taken over."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"cannot make the {flag} folder {path}: {e.strerror}")
    lock, me = os.path.join(path, LOCK), str(os.getpid())
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(lock) as f:
                    owner = int(f.read().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and pid_alive(owner):
                fail(f"{flag} {path} is in use by another run (process {owner}, {lock}); give another {flag}, or wait "
                     f"for that run to end")
            try:
                os.remove(lock)                          # stale: its process is gone
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            fail(f"cannot write in the {flag} folder {path}: {e.strerror}")
        with os.fdopen(fd, "w") as f:
            f.write(me)
        atexit.register(release_out_dir, lock, me)
        return path
    fail(f"{flag} {path}: cannot take {lock} (another run is starting there?)")


def release_out_dir(lock, me):
    try:
        with open(lock) as f:
            if f.read().strip() == me:
                os.remove(lock)
    except OSError:
        pass


def check_finite(args, names):
    """Float flags that must be finite numbers (inf and nan pass argparse's float())."""
    for k in names:
        v = getattr(args, k)
        if v is not None and not math.isfinite(v):
            fail(f"--{k} must be a finite number, got {v}")

# -----------------------------------------------------------------------------
# the device


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_for(device, dtype=torch.bfloat16):
    """Mixed precision for a device: bf16 autocast on CUDA; float32 on the CPU (bf16 matrix
    products are about 100x slower on the project's CPUs). `with autocast_for(dev): ...`"""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype, enabled=kind == "cuda")


def peak_flops(device_name):
    """Peak dense bf16 FLOP/s of a known GPU, for MFU (None if unknown): H100 SXM 989e12, H100
    PCIe 756e12, H100 NVL 835e12, H200 and GH200 989e12, A100 312e12."""
    n = device_name.upper()
    if "H100" in n:
        return 756e12 if "PCIE" in n else 835e12 if "NVL" in n else 989e12
    if "H200" in n:
        return 989e12
    if "A100" in n:
        return 312e12
    return None

# -----------------------------------------------------------------------------
# training loops


class StopFlag:
    """Ctrl-C (SIGINT) during training only raises a flag, which the loop reads between steps
    (under DDP through agree(), so every rank stops at the same step), so the checkpoint it then
    saves never holds a half-applied step. A second Ctrl-C stops at once."""

    def __init__(self):
        self.hit = False
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, *_):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True


class StepBar:
    """The progress bar of a training loop, which ends where the run ends: over the steps
    start..end, or with a time budget (--minutes, where the steps are not known) over its seconds.
    update(step, seconds) at the top of each step; finish() when the loop ends (complete: the run
    got to its end, a step limit or the time, and the bar shows it full)."""

    def __init__(self, start, end, budget_s=None, disable=False):
        from tqdm import tqdm
        self.start, self.timed = start, budget_s is not None
        total = max(1, int(budget_s)) if self.timed else max(0, end - start)
        timed = dict(bar_format="{l_bar}{bar}| {n}/{total} s of the time [{elapsed}<{remaining}]") if self.timed else {}
        self.bar = tqdm(total=total, unit="step", disable=disable, dynamic_ncols=True, mininterval=5, **timed)

    def update(self, step, seconds):
        n = min(self.bar.total, int(seconds)) if self.timed else step - self.start
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def finish(self, complete):
        if complete and self.bar.total > self.bar.n:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()

    def write(self, msg):
        self.bar.write(msg)

    def describe(self, text):
        self.bar.set_description(text, refresh=False)


def nonfinite(*tensors):
    """Is any of these tensors (a loss, a gradient norm) NaN or infinite? (one host sync)"""
    return not all(bool(torch.isfinite(t).all()) for t in tensors)


@torch.no_grad()
def refuse_nonfinite_weights(what, step, path, *modules):
    """Before a checkpoint is written: one error line if any parameter or buffer of these modules
    is NaN or infinite (the last checkpoint written stands)."""
    if not all(bool(torch.isfinite(t).all()) for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()):
        fail(f"{what} diverged: the weights are NaN or infinite at step {step}, so they were not saved; the last "
             f"checkpoint written, {path}, stands (if any): continue it with --resume, with a lower --lr")


def diverged(what, bad, saved, path, master):
    """A NaN or infinite loss (bad: step, loss, gradient norm): one error line on the master, exit
    on the others; nothing saved, the checkpoint of step `saved` (None: none yet) stands."""
    if not master:
        raise SystemExit(1)
    step, loss, gnorm = bad
    kept = (f"{path} (step {saved}) stands: continue it with --resume" if saved is not None else
            f"no {'' if what == 'training' else what + ' '}checkpoint was written by this run")
    fail(f"{what} diverged at step {step}: the loss is {loss} (gradient norm {gnorm}); the weights were not saved, "
         f"{kept} (a lower --lr, or check --data for NaN)")


@torch.no_grad()
def ema_update(ema, model, step, decay):
    """The EMA of the weights, with a short warm-up: decay min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)

# -----------------------------------------------------------------------------
# several processes (torchrun)


def setup_ddp(device):
    """DDP when launched by torchrun (RANK set): one process a device, NCCL on CUDA and gloo on
    the CPU. Returns (ddp, rank, world, device): the device is this rank's own GPU on CUDA."""
    if "RANK" not in os.environ:
        return False, 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def agree(ddp, device, *flags):
    """Flags of this process -> the same on every process (one all-reduce, any True wins), so all
    ranks stop at the same step."""
    if not ddp:
        return list(flags)
    f = torch.tensor([float(x) for x in flags], device=device)
    dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return [bool(x) for x in f.tolist()]


BUCKET = 2 ** 24     # elements a flat communication buffer holds at most (64 MB in float32)


def buckets(tensors, cap=BUCKET):
    """Consecutive runs of tensors of one dtype and device, about `cap` elements each at most (a
    larger tensor is a bucket of its own): what one collective call carries."""
    out, n = [], 0
    for t in tensors:
        if out and n + t.numel() <= cap and (t.dtype, t.device) == (out[-1][0].dtype, out[-1][0].device):
            out[-1].append(t)
            n += t.numel()
        else:
            out.append([t])
            n = t.numel()
    return out


def allreduce(model, world, cap=BUCKET):
    """Average gradients over processes by hand (distill.py's rollout calls the model many times
    outside DistributedDataParallel's forward): flattened into buckets, one all-reduce a bucket.
    Every rank runs the same code path, so the same parameters have gradients everywhere."""
    if world <= 1:
        return
    for bucket in buckets([q.grad for q in model.parameters() if q.grad is not None], cap):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat /= world
        for grad, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(avg)


@torch.no_grad()
def broadcast(modules, src=0, cap=BUCKET):
    """Every rank takes rank src's weights (parameters and buffers) of these modules (None: skipped),
    in flat buckets: at a stage's start all ranks hold the same networks, whatever file each read."""
    tensors = [t for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers())]
    for bucket in buckets(tensors, cap):
        flat = _flatten_dense_tensors(bucket)
        dist.broadcast(flat, src)
        for t, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(v)
