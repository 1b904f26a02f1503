"""One job at a time on the model: a bounded FIFO queue, a single worker thread, progress, interrupt and skip.

The interface every front end of the server uses (the HTTP API now, a Gradio page later, in the same process):

    queue = JobQueue(max_waiting=8)
    ticket = queue.submit(work, label="txt2img")   # QueueFull when max_waiting jobs already wait
    ticket.future.result()                         # what work(ticket) returned, or the exception it raised
    queue.progress(ticket.id)                      # A1111's /progress object, with this ticket's queue position
    queue.interrupt() / queue.skip()               # the running job stops after its current step / batch
    queue.cancel(ticket)                           # a job still waiting is dropped (its client went away)
    queue.close()                                  # refuse new jobs, drop the waiting ones, interrupt the running

work(ticket) runs on the worker thread. It hands `ticket.step` to the generation layer as its per-step
callback (ldm.generate.run's `preview`): that records the progress and the latest latent, and raises
Interrupted (or Skipped) at the next step once asked, which the run loop turns into a clean stop that keeps
the pictures already made.
"""
import collections
import itertools
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Callable

import torch

from ldm.generate.errors import Interrupted, Skipped


class QueueFull(Exception):
    """max_waiting jobs already wait; retry_after: seconds after which a retry is likely to be taken."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the queue is full ({waiting} jobs waiting): retry in about {retry_after} s")
        self.retry_after = retry_after


class QueueClosed(Exception):
    """The server is shutting down."""


class Ticket:
    """A submitted job: its future, its state and its progress, written by the worker and read by anyone."""

    def __init__(self, work: Callable, label: str, ticket_id: str | None, number: int):
        self.work, self.label, self.number = work, label, number
        self.id = ticket_id or uuid.uuid4().hex
        self.future: Future = Future()
        self.submitted = time.time()
        self.started: float | None = None
        self.state = "queued"  # queued, running, done, cancelled
        self.expected_passes = 1  # sampling passes the job will make (n_iter, twice with the hires fix)
        self.passes_done = 0
        self.step_index, self.step_total = 0, 0
        self.latest_latent: torch.Tensor | None = None  # the first image's predicted x0 at the latest step
        self.interrupt_requested = self.skip_requested = False
        self.interrupted = self.skipped = False

    def step(self, info: dict):
        """The samplers' per-step callback (info: i, total, x, x0)."""
        if self.step_total and info["i"] < self.step_index:  # a new sampling pass began (next batch, hires pass)
            self.passes_done += 1
        self.step_index, self.step_total = info["i"], info["total"]
        denoised = info.get("x0") if info.get("x0") is not None else info.get("x")
        if denoised is not None:
            self.latest_latent = denoised[:1].detach().float().cpu()
        if self.interrupt_requested:
            self.interrupted = True
            raise Interrupted(f"step {info['i'] + 1} of {info['total']} (interrupted over HTTP)")
        if self.skip_requested:
            self.skip_requested, self.skipped = False, True
            raise Skipped(f"step {info['i'] + 1} of {info['total']} (skipped over HTTP)")

    @property
    def fraction_done(self) -> float:
        if self.state == "done":
            return 1.0
        if self.state != "running" or not self.step_total:
            return 0.0
        current = min(1.0, (self.step_index + 1) / self.step_total)
        return min(1.0, (self.passes_done + current) / max(1, self.expected_passes, self.passes_done + 1))


class JobQueue:
    def __init__(self, max_waiting: int = 8, log=print):
        if max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        self.max_waiting, self.log = max_waiting, log
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._by_id: dict[str, Ticket] = {}
        self._running: Ticket | None = None
        self._closed = False
        self._numbers = itertools.count(1)
        self._lock = threading.Condition()
        self._recent_seconds = collections.deque(maxlen=8)  # how long recent jobs ran, for Retry-After
        self._worker = threading.Thread(target=self._work, name="generation-worker", daemon=True)
        self._worker.start()

    # --- submitting ----------------------------------------------------------------------------------------------
    def submit(self, work: Callable[[Ticket], object], label: str, ticket_id: str | None = None) -> Ticket:
        with self._lock:
            if self._closed:
                raise QueueClosed("the server is shutting down: no new jobs are taken")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(len(self._waiting), self.retry_after_seconds())
            if ticket_id is not None and ticket_id in self._by_id:
                ticket_id = None  # a reused force_task_id gets a fresh one rather than two jobs under one name
            ticket = Ticket(work, label, ticket_id, next(self._numbers))
            self._waiting.append(ticket)
            self._by_id[ticket.id] = ticket
            self._lock.notify_all()
            return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Drop a job that has not started; True when it was dropped."""
        with self._lock:
            if ticket.state != "queued":
                return False
            self._waiting.remove(ticket)
            self._forget(ticket, "cancelled")
            ticket.future.cancel()
            return True

    def retry_after_seconds(self) -> int:
        typical = sorted(self._recent_seconds)[len(self._recent_seconds) // 2] if self._recent_seconds else 5.0
        return max(1, round(typical))

    # --- the running job -----------------------------------------------------------------------------------------
    def interrupt(self) -> bool:
        with self._lock:
            if self._running is not None:
                self._running.interrupt_requested = True
            return self._running is not None

    def skip(self) -> bool:
        with self._lock:
            if self._running is not None:
                self._running.skip_requested = True
            return self._running is not None

    def close(self, interrupt_running: bool = True):
        """Refuse new jobs and drop the waiting ones; the running one stops after its current step (its
        saved files are kept) unless interrupt_running is False."""
        with self._lock:
            self._closed = True
            while self._waiting:
                ticket = self._waiting.popleft()
                self._forget(ticket, "cancelled")
                ticket.future.set_exception(QueueClosed("the server shut down before this job started"))
            if interrupt_running and self._running is not None:
                self._running.interrupt_requested = True
            self._lock.notify_all()

    def join(self, timeout: float | None = None):
        self._worker.join(timeout)

    @property
    def running(self) -> Ticket | None:
        return self._running

    # --- progress ------------------------------------------------------------------------------------------------
    def progress(self, ticket_id: str | None = None) -> dict:
        """A1111's /progress fields for the running job; with ticket_id, that job's state and queue position."""
        with self._lock:
            running, waiting = self._running, list(self._waiting)
            ticket = self._by_id.get(ticket_id) if ticket_id else None
        focus = ticket or running
        progress = focus.fraction_done if focus is not None and focus.state == "running" else 0.0
        elapsed = time.time() - focus.started if focus is not None and focus.started else 0.0
        eta = elapsed / progress - elapsed if progress > 0 else None
        position = waiting.index(ticket) + 1 if ticket in waiting else 0
        state = {
            "skipped": bool(running and running.skipped),
            "interrupted": bool(running and running.interrupted),
            "stopping_generation": bool(running and running.interrupt_requested),
            "job": running.label if running else "",
            "job_count": (running.expected_passes if running else 0) + len(waiting),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(running.started)) if running else "0",
            "job_no": running.passes_done if running else 0,
            "sampling_step": running.step_index + 1 if running and running.step_total else 0,
            "sampling_steps": running.step_total if running else 0,
            "queue_size": len(waiting),
            "queue_position": position,
            "id_task": focus.id if focus else None,
            "task_state": focus.state if focus else None,
        }
        return {"progress": progress, "eta_relative": eta if eta is not None else 0.0, "state": state,
                "current_latent": focus.latest_latent if focus is not None and focus.state == "running" else None}

    # --- the worker ----------------------------------------------------------------------------------------------
    def _forget(self, ticket: Ticket, state: str):
        ticket.state = state
        self._by_id.pop(ticket.id, None)

    def _work(self):
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return
                ticket = self._waiting.popleft()
                ticket.state, ticket.started, self._running = "running", time.time(), ticket
            result = error = None
            try:
                result = ticket.work(ticket)
            except BaseException as raised:  # noqa: BLE001 - handed to the waiting client, the worker goes on
                error = raised
            with self._lock:  # done before the client hears of it, so that its next /progress sees the queue free
                self._recent_seconds.append(time.time() - ticket.started)
                self._running = None
                self._forget(ticket, "done")
            if error is not None:
                ticket.future.set_exception(error)
            else:
                ticket.future.set_result(result)
