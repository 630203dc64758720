"""Training: Adam, gradient clipping, curriculum stages, best-on-validation
checkpoints, exact resume (Sec. 4.3.1 of the paper).

An epoch shows every training image once, each with one of its captions drawn
at random, in batches of 128 pairs whose other 127 pairs are the negatives.
After each epoch the model is scored on the validation split (rsum); the best
epoch so far is kept in ``best.pt``. A stage ends after ``max_epochs`` or, if
set, ``patience`` epochs without a better rsum; the next stage (curriculum: sum
-> max of hinges) starts from the best weights with a fresh Adam at its own lr.
Patience counts no epoch on the plateau (``losses.on_plateau``: loss >= ``PLATEAU_SHARE`` x ``plateau_loss``),
where max-of-hinges runs can sit 25-75 epochs before they learn.

Run folder::

    config.json     the fully resolved TrainConfig
    run.json        data paths, feature info, vocabulary size, state (training, then finished),
                    the run's random id (every checkpoint carries it: one from another run is refused)
    best.pt         best model so far (what evaluate/search load)
    last.pt         everything needed to resume (model, Adam, RNG, counters); written
                    at most every ``checkpoint_every`` seconds, at stage ends and at the
                    end, each time just after best.pt
    metrics.jsonl   one line per epoch: loss, validation metrics, time
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fnemm.io.progress import bar as progress_bar, say

from fnemm.joint.checkpoint import (FORMAT as CHECKPOINT_FORMAT, check_run_id, image_lists, resolve_device,
                                    tensors_copied)
from fnemm.training import distributed
from fnemm.joint.config import TrainConfig, differences, validate
from fnemm.joint.inputs import SplitData, build_vocab, embed_captions, split_data
from fnemm.training.image_side import FeatureRows
from fnemm.datasets import Dataset
from fnemm.training.distributed import Dist
from fnemm.training.folders import check_resumed_features, mark_finished, note_resumed, run_software
from fnemm.training.optim import clip_gradients, new_optimizer
from fnemm.io.errors import FnemmError
from fnemm.io.faults import fault
from fnemm.io.locks import folder_lock
from fnemm.eval.metrics import at_chance, chance_rsum, evaluate_embeddings, format_metrics
from fnemm.features.store import Features
from fnemm.io.files import atomic_torch_save, atomic_write_json, atomic_write_text, load_torch_data, relative_to
from fnemm.joint.losses import contrastive_loss, on_plateau
from fnemm.joint.model import JointEmbedding
from fnemm.joint.text import Vocab, pad_batch


@dataclass
class TrainState:
    """Counters that, with the model, Adam and the RNGs, define where a run is."""
    stage: int = 0
    stage_epoch: int = 0              # epochs done in the current stage
    epoch: int = 0                    # epochs done in all
    best_rsum: float = -math.inf      # best validation rsum of the whole run
    best_epoch: int = 0
    stage_best_rsum: float = -math.inf
    stale: int = 0                    # epochs since the stage's best
    done: bool = False
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, config: TrainConfig, train: SplitData, val: SplitData, vocab: Vocab,
                 out_dir: Path, device: str = "cpu", quiet: bool = False, run_info: dict | None = None,
                 checkpoint_every: float = 120.0, dist: Dist | None = None, images=None):
        validate(config)
        self.config, self.train_data, self.val_data, self.vocab = config, train, val, vocab
        self.out = Path(out_dir)
        self.device = resolve_device(device)
        self.dist = dist                       # several processes (fnemm.training.distributed); None: one
        self.main = dist is None or dist.main  # the one process that validates and writes
        self.quiet = quiet or not self.main
        self.run_info = run_info or {}
        # a random id, in run.json and in every checkpoint of the run: a best.pt swapped in
        # from another run (with its checksums.json) is refused (fnemm.joint.checkpoint)
        self.run_id: str | None = None
        # last.pt (model + Adam: hundreds of MB at the paper's sizes) at most this often (s); 0: every epoch
        self.checkpoint_every = checkpoint_every
        self._saved_at = -math.inf
        # best.pt's next contents: written just before last.pt and when a stage ends, not at
        # every improvement (writing it was a fifth of a demo epoch)
        self._unwritten_best: dict | None = None
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.model = JointEmbedding(config.model, len(vocab), train.features.shape[1]).to(self.device)
        # where the images come from: feature rows, or (fine-tuning) a CNN reading photos
        self.images = images if images is not None else FeatureRows(train, val, self.device)
        # every image the model learnt from and those that chose its best epoch, in each checkpoint
        self.image_lists = image_lists([*self.images.seen_before, *train.image_ids], val.image_ids)
        self.net = self._distribute(self.images.wrap(self.model))
        self.state = TrainState()
        self.optimizer = self._new_optimizer()

    # --- checkpoints ---------------------------------------------------------
    def _new_optimizer(self) -> torch.optim.Optimizer:
        # A finished run has stage == len(stages); its optimizer is the last stage's.
        stage = min(self.state.stage, len(self.config.stages) - 1)
        return new_optimizer(self.model, self.config.stages[stage].lr, self.config.image_weight_decay,
                             self.config.adam, self.images.parameters(), self.images.lr_scale)

    def _payload(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": 1, "config": self.config.to_dict(),
                "vocab": self.vocab.itos[2:], "feature_dim": self.model.feature_dim,
                "features": self.run_info.get("features", {}), "preset": self.run_info.get("preset"),
                "model": self.model.state_dict(), "run_id": self.run_id, **self.image_lists,
                **self.images.state()}

    def _distribute(self, module: torch.nn.Module) -> torch.nn.Module:
        """What a batch goes through: ``module``, or DDP around it (several processes)."""
        if self.dist is None:
            return module
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(module, device_ids=[self.device] if self.device != "cpu" else None)

    def _validate(self) -> dict:
        captions, owner = self.val_data.eval_captions(self.config.eval_captions)
        img = self.images.embed_val(self.model)
        cap = embed_captions(self.model, captions, self.device)
        return evaluate_embeddings(img, cap, owner, self.config.model.similarity)

    def _forward_loss(self, images, tokens, lengths, parts, world: int, stage) -> torch.Tensor:
        img, cap = self.net(images, tokens.to(self.device), lengths)
        if self.dist is None:
            return contrastive_loss(img, cap, self.config.model.similarity, stage.loss, stage.margin)
        return distributed.sharded_loss(img, cap, parts, self.dist.rank, world, self.config.model.similarity,
                                        stage.loss, stage.margin)

    def _write_metrics(self) -> None:
        if not self.main:
            return
        lines = "".join(json.dumps(h) + "\n" for h in self.state.history)
        atomic_write_text(self.out / "metrics.jsonl", lines)

    def _keep_best(self, val: dict) -> None:
        """The model as it is now, to be best.pt (written by :meth:`_write_best`)."""
        st = self.state
        payload = tensors_copied(self._payload())        # training goes on changing the live tensors
        self._unwritten_best = {**self.images.best(payload, st.epoch, self.out), "epoch": st.epoch,
                                "stage": st.stage + 1, "val": val}

    def _write_best(self) -> None:
        if self.main and self._unwritten_best is not None:
            atomic_torch_save(self.out / "best.pt", record=True, obj=self._unwritten_best)
            self._unwritten_best = None

    def _save_last(self) -> None:
        if not self.main:
            return
        # best.pt first: a run killed between the two writes resumes from the older
        # last.pt and replays the epochs since, writing the same best.pt again
        self._write_best()
        self._saved_at = time.monotonic()
        atomic_torch_save(self.out / "last.pt", record=True, obj={
            **self._payload(),
            "optimizer": self.optimizer.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            # the GPU's generator too (dropout draws there): a resume on a GPU continues exactly
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.startswith("cuda") else None,
            "state": self.state.__dict__,
        })
        self._write_metrics()

    def _restore(self, ckpt: dict) -> None:
        # compared as configs, not dicts: a field added since the run started takes its
        # default, which is what the run was trained with
        try:
            saved = TrainConfig.from_dict(ckpt["config"])
        except (KeyError, TypeError, ValueError):
            saved = None
        if saved != self.config:
            raise FnemmError(f"{self.out / 'last.pt'}: the run was made with another config "
                             f"({differences(saved, self.config)}); resume without changing presets/--set, "
                             f"or use a new --out")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.state = TrainState(**ckpt["state"])
            self.images.load_state(ckpt)
            self.run_id = ckpt.get("run_id")          # None: a run from before ids
        except (KeyError, TypeError, RuntimeError) as e:
            raise FnemmError(f"{self.out / 'last.pt'}: damaged or from another fnemm ({type(e).__name__}); "
                             f"start the run again in a new --out") from None
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.rng.bit_generator.state = ckpt["numpy_rng"]
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if ckpt.get("cuda_rng") is not None and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), self.device)

    def _start(self, resume: bool) -> None:
        last = self.out / "last.pt"
        exists = last.exists()
        if self.dist is not None:              # every process decides as the first one found the folder
            exists = distributed.broadcast(exists)
        if exists:
            if not resume:
                raise FnemmError(f"{self.out}: a run is already here; pass --resume to continue it "
                                 f"or choose another --out")
            # on the CPU: the RNG states must stay there (torch.set_rng_state takes a CPU tensor);
            # the model and Adam's state are copied to the device as they load
            ckpt = load_torch_data(last, "start the run again in a new --out")
            check_run_id(last, ckpt)
            self._restore(ckpt)
            self._write_metrics()       # metrics.jsonl as last.pt knows it (repairs a damaged one)
            if self.main and not self.state.done:
                note_resumed(self.out, self.state.epoch, self.device)
            saved = self.out / "config.json"
            if self.main and (not saved.is_file() or saved.read_bytes() != (self.config.to_json() + "\n").encode()):
                # config.json as last.pt knows it: a damaged one (a field gone) is written again
                atomic_write_text(self.out / "config.json", self.config.to_json() + "\n")
            return
        if self.main:
            self.run_id = uuid.uuid4().hex
            atomic_write_text(self.out / "config.json", self.config.to_json() + "\n")
            info = {**self.run_info, "state": "training", "vocab_size": len(self.vocab), "feature_dim": self.model.feature_dim}
            atomic_write_json(self.out / "run.json", {**info, "run_id": self.run_id, "software": run_software(self.device)})
        self._save_last()

    # --- one epoch -------------------------------------------------------------
    def _epoch(self) -> float:
        stage = self.config.stages[self.state.stage]
        data = self.train_data
        self.net.train()
        perm = self.rng.permutation(len(data))
        picks = self.rng.integers(0, [len(data.captions[k]) for k in perm])
        bs = self.config.batch_size
        total, batches = 0.0, 0
        desc = (f"stage {self.state.stage + 1}/{len(self.config.stages)} "
                f"epoch {self.state.stage_epoch + 1}/{stage.max_epochs}")
        world = self.dist.world if self.dist else 1
        # in a log, lines within an epoch only for long epochs (the epoch line says the rest)
        bar = progress_bar(range(0, len(perm), bs), desc=desc, leave=False, quiet=self.quiet, unit="batch",
                           every=120.0)
        for start in bar:
            idx, pick = perm[start:start + bs], picks[start:start + bs]
            if len(idx) < max(2, world):      # a lone pair has no negatives; every process needs a pair
                continue
            if self.dist is not None:         # this process's share of the (global) batch
                parts = distributed.shares(len(idx), world)
                idx, pick = idx[parts[self.dist.rank]], pick[parts[self.dist.rank]]
            images = self.images.batch(idx, self.state.epoch)
            tokens, lengths = pad_batch([data.captions[k][p] for k, p in zip(idx, pick)])
            loss = self._forward_loss(images, tokens, lengths, parts if self.dist is not None else None,
                                      world, stage)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients([*self.model.parameters(), *self.images.parameters()], self.config.grad_clip, self.config.grad_clip_mode)
            self.optimizer.step()
            total += loss.item() / world
            batches += 1
            bar.set_postfix(loss=f"{loss.item() / world:.3f}")
            fault(f"batch-{batches}", f"{self.out.name}/epoch-{self.state.epoch + 1}/batch-{batches}")
        if self.dist is not None:             # the batch losses are the processes' parts summed
            total = distributed.all_sum(total)
        return total / max(batches, 1)

    def _next_stage(self) -> None:
        st = self.state
        st.stage += 1
        st.stage_epoch, st.stale, st.stage_best_rsum = 0, 0, -math.inf
        if st.stage < len(self.config.stages):
            # Curriculum: the next stage starts from the best model so far.
            self._write_best()
            if self.dist is not None:
                distributed.barrier()          # the first process has written it
            best = load_torch_data(self.out / "best.pt", "resume the run to write it again")
            self.model.load_state_dict(best["model"])
            self.images.load_state(best)
            self.optimizer = self._new_optimizer()
        else:
            st.done = True

    def _stage_over(self) -> bool:
        stage = self.config.stages[self.state.stage]
        return (self.state.stage_epoch >= stage.max_epochs
                or (stage.patience is not None and self.state.stale >= stage.patience))

    def fit(self, resume: bool = False) -> dict:
        """Train (or resume) to the end; one process (group) at a time per run folder."""
        with distributed.collective_work() if self.dist is not None else contextlib.nullcontext():
            with folder_lock(self.out, "a training run") if self.main else contextlib.nullcontext():
                summary = self._fit(resume)
            if self.dist is not None:
                distributed.barrier()         # the first process has written everything
        return summary

    def _fit(self, resume: bool) -> dict:
        self._start(resume)
        st = self.state
        while not st.done:
            if self._stage_over():
                self._next_stage()
                self._save_last()
                continue
            t0 = time.perf_counter()
            loss = self._epoch()
            val = self._validate() if self.main else None
            if self.dist is not None:          # the others follow the first process's validation
                val = distributed.broadcast(val)
            st.epoch += 1
            st.stage_epoch += 1
            improved = val["rsum"] > st.best_rsum
            if val["rsum"] > st.stage_best_rsum:
                st.stage_best_rsum, st.stale = val["rsum"], 0
            else:
                st.stale += 1
            stage = self.config.stages[st.stage]
            if on_plateau(loss, stage.loss, stage.margin, self.config.batch_size):
                st.stale = 0                  # still on the plateau: patience has not started
            if improved:
                st.best_rsum, st.best_epoch = val["rsum"], st.epoch
                if self.main:
                    self._keep_best(val)
            st.history.append({"epoch": st.epoch, "stage": st.stage + 1, "stage_epoch": st.stage_epoch,
                               "lr": self.config.stages[st.stage].lr, "loss": loss, "val": val,
                               "best": improved, "time_s": round(time.perf_counter() - t0, 3)})
            # A run killed between two last.pt writes resumes from the older one and
            # re-runs the epochs since, identically (the RNG state is in last.pt).
            if time.monotonic() - self._saved_at >= self.checkpoint_every:
                self._save_last()
            else:
                self._write_metrics()
            fault(f"epoch-{st.epoch}", f"{self.out.name}/epoch-{st.epoch}")
            if not self.quiet:
                say(self._epoch_line(loss, val, improved, time.perf_counter() - t0))
        if self.main:
            mark_finished(self.out)
        return self.best_summary()

    def _epoch_line(self, loss: float, val: dict, improved: bool, seconds: float) -> str:
        """'epoch 12 (stage 1/2: 12 of at most 400, 3/10 without a better rsum) loss ... | val ... | 80 s'."""
        st, stage = self.state, self.config.stages[self.state.stage]
        where = f"stage {st.stage + 1}/{len(self.config.stages)}: {st.stage_epoch} of at most {stage.max_epochs}"
        if on_plateau(loss, stage.loss, stage.margin, self.config.batch_size):
            where += ", on the loss plateau: patience waits"
        elif stage.patience is not None:
            where += f", {st.stale}/{stage.patience} without a better rsum"
        return (f"epoch {st.epoch} ({where}) loss {loss:.3f} | val {format_metrics(val)} | {seconds:.0f} s"
                f"{'  *best' if improved else ''}")

    def best_summary(self) -> dict:
        best = next((h for h in self.state.history if h["epoch"] == self.state.best_epoch), None)
        return {"best_epoch": self.state.best_epoch, "epochs": self.state.epoch,
                "val": best["val"] if best else None, "out": str(self.out)}


def train(config: TrainConfig, dataset: Dataset, features: Features, out_dir: str | Path,
          *, resume: bool = False, device: str = "cpu", quiet: bool = False,
          run_info: dict | None = None, checkpoint_every: float = 120.0) -> dict:
    """Train ``config`` on ``dataset``'s train split, select on its val split.

    Returns the best epoch's summary; the run folder holds the checkpoints.
    """
    validate(config)
    if resume:
        check_resumed_features(Path(out_dir), features)
    dist, device = distributed.from_env(resolve_device(device))     # under torchrun: one of N processes
    vocab = build_vocab(dataset)
    vocab.max_tokens = config.max_caption_tokens
    train_split = split_data(dataset, features, vocab, "train")
    val_split = split_data(dataset, features, vocab, "val")
    if config.val_images and len(val_split) > config.val_images:      # MSCOCO: select on the first 1K
        val_split = val_split.head(config.val_images)
    chance = chance_rsum(len(val_split), config.eval_captions) if len(val_split) >= 2 else (0.0, 0.0)
    if not quiet and (dist is None or dist.main):
        from fnemm.eval.protocols import warn_small
        warn_small(len(val_split), "validation")
        say(f"validation: {len(val_split)} images x {config.eval_captions} captions; chance (random embeddings) "
            f"scores rsum {chance[0]:.1f} ± {chance[1]:.1f}")
    info = {"dataset": dataset.name, "n_train": len(train_split), "n_val": len(val_split),
            "val_chance": {"rsum": chance[0], "std": chance[1]},
            "features": features.provenance(),
            **(run_info or {})}
    if Path(features.source).exists():        # found again when the run and its store move together
        info["features"]["source_relative"] = relative_to(features.source, out_dir)
    trainer = Trainer(config, train_split, val_split, vocab, Path(out_dir), device, quiet, info,
                      checkpoint_every, dist)
    summary = trainer.fit(resume=resume)
    summary["at_chance"] = at_chance(summary, chance)
    if summary["at_chance"] and (dist is None or dist.main):
        warnings.warn(f"{out_dir}: the best validation rsum, {summary['val']['rsum']:.1f}, is within 2 std of chance "
                      f"({chance[0]:.1f} ± {chance[1]:.1f}): this model is at chance; it has learnt nothing the "
                      f"validation images can tell (too few training images, or a learning rate that does not "
                      f"start: see README, Fidelity)", stacklevel=2)
    return summary
