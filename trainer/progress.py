"""The rich progress display of a training run (rank 0 only): samples/s, loss, lr, temperature, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RichReporter:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = None

    def start(self, total_steps: int, start_step: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def step(self, m: dict) -> None:
        stats = (
            f"{m['samples_per_s']:7.1f} samples/s  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
            f"exp(t) {m['temperature']:.1f}"
        )
        self.progress.update(self.task, completed=m["step"], stats=stats)

    def eval(self, m: dict) -> None:
        shown = {k: v for k, v in m.items() if k not in ("step", "epoch")}
        text = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        self.progress.console.print(f"[cyan]eval[/] epoch {m['epoch']}: {text}")

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def close(self) -> None:
        self.progress.stop()
