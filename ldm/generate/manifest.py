"""<outdir>/manifest.jsonl: what a resumable run (--resume, and every run under torchrun) has made.

One JSON object a line:
- first the run's: {"run": {"fingerprint", "first_number", "images", "batches", "seed", "subseed"}}, where
  first_number is the file number reserved for the run's first picture (picture k gets first_number + k);
- one line a picture, written as it is saved: {"batch", "image", "prompt", "seed", ["subseed",] "file",
  "rank"}, with "file" relative to the output folder, or null and "failed" for a picture that came out NaN;
- in --seed_mode batch, one {"draws": ...} line: what a batch draws from the run's generator
  (ldm.generate.sharding.DrawRecorder).

Each line is appended with one write to a file opened O_APPEND, so processes that write at once never mix
their lines; a last line cut short by a crash is not read.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ldm.generate.output import SaveFailed, _atomic_write_bytes

MANIFEST_NAME = "manifest.jsonl"


@dataclass
class ManifestContents:
    run: dict | None = None
    draws: list | None = None
    pictures: list[dict] = field(default_factory=list)

    def lines(self) -> list[dict]:
        head = [{"run": self.run}] if self.run is not None else []
        return head + ([{"draws": self.draws}] if self.draws is not None else []) + self.pictures


class Manifest:
    def __init__(self, outdir: Path):
        self.outdir = Path(outdir)
        self.path = self.outdir / MANIFEST_NAME

    def read(self) -> ManifestContents:
        contents = ManifestContents()
        if not self.path.is_file():
            return contents
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # cut short by a crash
                continue
            if not isinstance(record, dict):
                continue
            if isinstance(record.get("run"), dict):
                contents.run = record["run"]
            elif isinstance(record.get("draws"), list):
                contents.draws = record["draws"]
            elif "image" in record:
                contents.pictures.append(record)
        return contents

    def append(self, record: dict):
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                written = os.write(descriptor, data)
                while written < len(data):  # only a full disk or a signal writes less: finish the line
                    written += os.write(descriptor, data[written:])
            finally:
                os.close(descriptor)
        except OSError as error:
            raise SaveFailed("the manifest", self.outdir, error) from None

    def rewrite(self, contents: ManifestContents):
        """Replace the manifest by `contents` at once (a crash leaves the old one or the new one)."""
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in contents.lines()).encode("utf-8")
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(self.path, data)
        except OSError as error:
            raise SaveFailed("the manifest", self.outdir, error) from None
