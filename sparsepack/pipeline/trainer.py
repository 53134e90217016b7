"""The training loop of ``finetune``: a sparse + low-rank correction on a frozen (quantized or dense) base.

Phases: an optional low-rank-only warm-up (RoSA), support selection by the method's rule (gradient statistics
streamed over ``mask_samples`` examples when the rule reads data), then training of every part on the fixed
support — restarting from the warm-up's A/B with a fresh optimizer and schedule (``restart``, as RoSA's
reference code does) or continuing. Methods without a sparse part (``lora``) run the last phase only; sparse-only
methods (``shira``) select first. Which parts exist, how the support is chosen and how the budget is spread
are the method's (``sparsepack.methods``); the loop knows phases, not methods.

Every ``save_every`` steps the whole training state is checkpointed (``checkpoint.py``); ``resume`` continues
from the latest checkpoint with the same data order and RNG, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsepack.config import TrainConfig
from sparsepack.kernels import CSRSupport, FisherState, fisher_accumulate
from sparsepack.layers.adapter_linear import SparseLowRankLinear
from sparsepack.layers.inject import find_targets, set_active_adapters, wrap
from sparsepack.methods import base as methods
from sparsepack.methods.base import Method
from sparsepack.methods.masks import SCORE_KINDS, SUPPORT_RULES, SupportContext
from sparsepack.methods.residual import residual_init
from sparsepack.pipeline import checkpoint as ckpt
from sparsepack.pipeline.batches import Batcher, Cursor
from sparsepack.pipeline.data import IGNORE_INDEX
from sparsepack.pipeline.errors import TrainingDivergedError


@dataclass
class Phase:
    name: str  # "warmup" (low-rank only) | "select" (support selection) | "train"
    steps: int = 0


@dataclass
class TrainState:
    phase: int = 0  # index into the phase list
    step: int = 0  # optimizer steps done in the current phase
    global_step: int = 0  # optimizer steps done in all phases
    tokens: int = 0  # label tokens trained on
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics rows


def main_steps(cfg: TrainConfig, n_examples: int) -> int:
    """Optimizer steps of the main training phase: ``--steps``, or ``--epochs`` passes over ``n_examples``."""
    return cfg.steps or max(1, math.ceil(cfg.epochs * n_examples / (cfg.batch_size * cfg.grad_accum)))


def plan_phases(method: Method, cfg: TrainConfig, steps: int) -> list[Phase]:
    """A residual initialization that takes the support from ``W_fp - W_q`` (at setup) has no warm-up, and its
    selection phase only hands the sparse values to the optimizer."""
    phases = []
    warm = method.sparse and method.lowrank and method.lowrank_warmup and cfg.warmup_steps > 0
    if warm and not cfg.residual_support:
        phases.append(Phase("warmup", cfg.warmup_steps))
    if method.sparse:
        phases.append(Phase("select"))
    phases.append(Phase("train", steps))
    return phases


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over trained tokens of ``KL(p_teacher || p_student)`` (nats), aligned like the LM loss.

    Args:
        student_logits, teacher_logits: ``[b, L, V]``; position ``t`` predicts token ``t + 1``.
        labels: ``[b, L]``, ``-100`` where a token is not trained on (padding, prompts).

    Returns:
        A scalar; the gradient flows into ``student_logits`` only.
    """
    keep = labels[:, 1:] != IGNORE_INDEX  # (b, L-1): the positions the LM loss averages over
    if not bool(keep.any()):
        return student_logits.sum() * 0.0
    log_q = F.log_softmax(student_logits[:, :-1][keep].float(), dim=-1)  # (N, V)
    log_p = F.log_softmax(teacher_logits[:, :-1][keep].detach().float(), dim=-1)  # (N, V)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # sum over V, mean over the N tokens


def cosine_lr(step: int, total: int, warmup_frac: float) -> float:
    """Multiplier: linear warm-up over ``warmup_frac * total`` steps, then cosine decay to 0."""
    warm = max(1, int(round(warmup_frac * total)))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Owns the model's adapted layers, optimizer, data order and phase; one instance per run."""

    def __init__(self, model: nn.Module, tokenizer, cfg: TrainConfig, examples, ckpt_dir: Path | None,
                 progress: bool = True, eval_windows: torch.Tensor | None = None,
                 teacher: nn.Module | None = None,
                 kl_examples: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:  # fmt: skip
        self.model = model
        self.teacher = teacher  # frozen fp model (KL term, residual init); see finetune.check_teacher
        self.cfg = cfg
        self.method = methods.get(cfg.method)
        self.support_rule = (cfg.support or self.method.support) if self.method.sparse else None
        self.device = torch.device(cfg.device)
        self.ckpt_dir = ckpt_dir
        self.progress = progress
        self.eval_windows = eval_windows
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.batcher = Batcher(examples, cfg.batch_size, pad, cfg.seed)
        # --kl-data: the KL term reads its own batches (own order, own cursor), one per training micro-batch
        self.kl_batcher = Batcher(kl_examples, cfg.batch_size, pad, cfg.seed + 1) if kl_examples else None
        self.phases = plan_phases(self.method, cfg, main_steps(cfg, len(examples)))
        self.state = TrainState()
        self.layers: dict[str, SparseLowRankLinear] = {}
        self.budgets = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.metrics_path = ckpt_dir / "metrics.jsonl" if ckpt_dir else None
        self.residual_summary: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model.requires_grad_(False)
        names = find_targets(self.model, cfg.target)
        shapes = {}
        for n in names:
            layer = wrap(self.model, n)
            self.layers[n] = layer
            shapes[n] = (layer.out_features, layer.in_features)
        self.budgets = self.method.layer_budgets(shapes, cfg.rank, cfg.density, cfg.budget)
        gen = torch.Generator().manual_seed(cfg.seed)
        for n, layer in self.layers.items():
            if self.budgets[n].rank:
                layer.init_lowrank(cfg.adapter, self.budgets[n].rank, cfg.alpha, cfg.dropout, gen)
        if cfg.residual_init:
            self._residual_init()
        if any(layer.has_adapter(cfg.adapter) for layer in self.layers.values()):
            set_active_adapters(self.model, cfg.adapter)  # a sparse-only method's adapter exists after selection

    def _residual_init(self) -> None:
        """Seed every layer's correction from ``W_teacher - W_base`` (``methods.residual``), one layer at a time.

        ``--init residual-lowrank`` fits only the low-rank part to the whole residual; the sparse part then
        starts at zero on the support the method's own rule chooses (RoSA: after the low-rank warm-up)."""
        if self.teacher is None:
            raise ValueError("a residual initialization needs the teacher model")
        a = self.cfg.adapter
        start = time.perf_counter()
        whiten = self.cfg.init == "residual-whitened"
        groups = self._memory_groups({n: layer.in_features**2 for n, layer in self.layers.items()}) if whiten else [
            list(self.layers)]  # fmt: skip
        for names in groups:  # --init residual-whitened: one teacher pass per group bounds the Gram matrices
            grams = self._teacher_grams(names) if whiten else {}
            for n in names:
                layer, b = self.layers[n], self.budgets[n]
                w_fp = self.teacher.get_submodule(n).weight.detach()
                nnz = b.nnz if self.cfg.residual_support else 0
                init = residual_init(w_fp, layer.dense_base(), b.rank, nnz, layer.scaling.get(a, 1.0), grams.get(n))
                if init.A is not None:
                    layer.lora_A[a].data.copy_(init.A)
                    layer.lora_B[a].data.copy_(init.B)
                if init.support is not None:
                    layer.set_support(a, init.support.to(self.device), init.values.to(self.device))
        # reported as the selection summary only when the residual fixed the support (--init residual)
        self.residual_summary = {"rule": "residual", "seconds": time.perf_counter() - start, "passes": 0,
                                 "nnz": sum(b.nnz for b in self.budgets.values())}  # fmt: skip

    def _teacher_grams(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``X^T X`` (fp64, ``[in, in]``) of the teacher's inputs to each named linear over ``init_samples``
        training examples, padding excluded. Does not consume training data (the batch cursor is restored)."""
        grams = {n: torch.zeros(self.layers[n].in_features, self.layers[n].in_features, dtype=torch.float64,
                                device=self.device) for n in names}  # fmt: skip
        keep = {}  # "mask": the current batch's attention mask, (b, L) fp64

        def hook(_m, args, _out, n):
            x = args[0].detach().double() * keep["mask"][..., None]  # (b, L, in), pad rows zeroed
            x = x.reshape(-1, x.shape[-1])
            grams[n].addmm_(x.T, x)

        handles = [self.teacher.get_submodule(n).register_forward_hook(partial(hook, n=n)) for n in names]
        try:
            with torch.no_grad():
                for batch in self._borrowed_batches(self.cfg.init_samples):
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    keep["mask"] = batch["attention_mask"].double()
                    self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return grams

    def _memory_groups(self, sizes: dict[str, int]) -> list[list[str]]:
        """Consecutive layers in groups of at most ``fisher_budget`` x the adapted weights' size (one layer at
        least): the extra memory of a streamed pass over the model."""
        total = sum(layer.out_features * layer.in_features for layer in self.layers.values())
        budget = max(max(sizes.values()), int(self.cfg.fisher_budget * total))
        groups, cur, used = [], [], 0
        for n in self.layers:
            if cur and used + sizes[n] > budget:
                groups.append(cur)
                cur, used = [], 0
            cur.append(n)
            used += sizes[n]
        groups.append(cur)
        return groups

    def _param_names(self) -> dict[int, str]:
        out = {}
        for n, layer in self.layers.items():
            for kind, d in (("A", layer.lora_A), ("B", layer.lora_B), ("S", layer.sparse_values)):
                if self.cfg.adapter in d:
                    out[id(d[self.cfg.adapter])] = f"{n}.{kind}"
        return out

    def _build_optimizer(self, with_sparse: bool) -> None:
        a = self.cfg.adapter
        lowrank = [p for layer in self.layers.values() for d in (layer.lora_A, layer.lora_B) if a in d for p in [d[a]]]
        sparse = [layer.sparse_values[a] for layer in self.layers.values() if a in layer.sparse_values]
        groups = []
        if lowrank:
            groups.append({"params": lowrank, "lr": self.cfg.lr_lowrank, "base_lr": self.cfg.lr_lowrank})
        if with_sparse and sparse:
            groups.append({"params": sparse, "lr": self.cfg.lr, "base_lr": self.cfg.lr})
        chosen = {id(q) for g in groups for q in g["params"]}
        for p in lowrank + sparse:
            p.requires_grad_(id(p) in chosen)
        # None until something trains: a sparse-only method has no parameter before its support is chosen
        self.optimizer = torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay) if groups else None

    # ------------------------------------------------------------------------------------------ steps

    def _loss_terms(self, batch: dict[str, torch.Tensor],
                    kl_batch: dict[str, torch.Tensor] | None = None) -> Iterator[torch.Tensor]:  # fmt: skip
        """The loss in terms whose sum is the training loss: the LM loss (plus ``kl_weight * KL(teacher ||
        student)`` on the same tokens when a teacher is set without ``--kl-data``), then, with ``kl_batch``
        (``--kl-data``), ``kl_weight * KL`` on that batch. Each term is built only when the next one is asked
        for, so a caller that runs a term's backward before asking holds one forward's activations at a time."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(**batch, use_cache=False)
        if self.teacher is None or self.cfg.kl_weight == 0:
            yield out.loss
            return
        if kl_batch is None:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        use_cache=False).logits  # fmt: skip
            yield out.loss + self.cfg.kl_weight * kl_to_teacher(out.logits, t_logits, batch["labels"])
            return
        lm = out.loss
        del out  # its logits and graph are not needed for the second term
        yield lm
        kl_batch = {k: v.to(self.device) for k, v in kl_batch.items()}
        with torch.no_grad():
            t_logits = self.teacher(input_ids=kl_batch["input_ids"], attention_mask=kl_batch["attention_mask"],
                                    use_cache=False).logits  # fmt: skip
        s_logits = self.model(input_ids=kl_batch["input_ids"], attention_mask=kl_batch["attention_mask"],
                              use_cache=False).logits  # fmt: skip
        yield self.cfg.kl_weight * kl_to_teacher(s_logits, t_logits, kl_batch["labels"])

    def _loss(self, batch: dict[str, torch.Tensor], kl_batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The whole loss as one tensor (all terms' graphs held at once): see ``_loss_terms``."""
        return sum(self._loss_terms(batch, kl_batch))

    def _backward(self, batch: dict[str, torch.Tensor], kl_batch: dict[str, torch.Tensor] | None, divisor: int,
                  where: str) -> float:  # fmt: skip
        """Accumulates the gradient of ``loss / divisor``, one term's backward at a time; returns the loss.

        Raises:
            TrainingDivergedError: before the backward of a NaN or infinite term; ``where`` names the step."""
        total = 0.0
        for term in self._loss_terms(batch, kl_batch):
            value = float(term.detach())
            total += value
            if not math.isfinite(value):
                raise TrainingDivergedError(f"loss became {total} at {where}; last good checkpoint: "
                                            f"{self._latest_name()}")  # fmt: skip
            (term / divisor).backward()
        return total

    def _train_step(self, phase: Phase) -> float:
        total = 0.0
        tokens = 0
        for _ in range(self.cfg.grad_accum):
            batch = self.batcher.next()
            kl_batch = self.kl_batcher.next() if self.kl_batcher else None
            where = f"step {self.state.global_step} ({phase.name})"
            total += self._backward(batch, kl_batch, self.cfg.grad_accum, where) / self.cfg.grad_accum
            tokens += int((batch["labels"][:, 1:] != -100).sum())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        mult = cosine_lr(self.state.step, phase.steps, self.cfg.lr_warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # a finite loss can still step into NaN (e.g. an overflowing update): never save it
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise TrainingDivergedError(f"a trained parameter became NaN or infinite at step "
                                            f"{self.state.global_step} ({phase.name}); last good checkpoint: "
                                            f"{self._latest_name()}")  # fmt: skip
        self.state.tokens += tokens
        return total

    def _latest_name(self) -> str:
        if self.ckpt_dir is None:
            return "none (no --save-every)"
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        return str(path) if path else "none yet"

    # ------------------------------------------------------------------------------------------ selection

    def _gradient_scores(self, kind: str, names: list[str]) -> dict[str, torch.Tensor]:
        """A gradient statistic of each named layer's dense weight over ``mask_samples`` examples (one pass):
        ``fisher``, the mean squared gradient (RoSA); ``grad``, the gradient of the examples' summed loss.

        A layer whose output needs no gradient (nothing trains yet: a sparse-only method before its support exists)
        gets a leaf copy of its output that does, so the gradient still reaches every scored layer."""
        if kind not in SCORE_KINDS:
            raise ValueError(f"unknown gradient statistic {kind!r}")
        if kind == "fisher":
            states = {n: FisherState.zeros(*self.layers[n].dense_base().shape, device=self.device) for n in names}
        else:
            sums = {n: torch.zeros(self.layers[n].out_features, self.layers[n].in_features, device=self.device)
                    for n in names}  # fmt: skip
        handles = []
        for n in names:

            def fwd(_m, args, out, n=n):
                x = args[0].detach()

                def on_grad(dy: torch.Tensor) -> None:
                    if kind == "fisher":
                        fisher_accumulate(states[n], dy.detach(), x)
                    else:  # (b*L, out)^T @ (b*L, in): the weight's gradient, summed over tokens
                        g = dy.detach().reshape(-1, dy.shape[-1]).float()
                        sums[n].addmm_(g.T, x.reshape(-1, x.shape[-1]).float())

                if not out.requires_grad:
                    out = out.detach().requires_grad_()
                out.register_hook(on_grad)
                return out

            handles.append(self.layers[n].register_forward_hook(fwd))
        # every group scores the same examples: selection consumes no training (or --kl-data) data
        batches = self._borrowed_batches(self.cfg.mask_samples)
        kl_batches = self._borrowed_batches(self.cfg.mask_samples, self.kl_batcher) if self.kl_batcher else None
        try:
            for batch in batches:
                self._backward(batch, next(kl_batches) if kl_batches else None, 1, "support selection")
                if self.optimizer is not None:
                    self.optimizer.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()
            for g in (batches, kl_batches):
                if g is not None:
                    g.close()  # puts the cursor back
        return {n: s.mean.float() for n, s in states.items()} if kind == "fisher" else sums

    def _borrowed_batches(self, count: int, batcher: Batcher | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The next micro-batches of ``batcher`` (default: the training data), covering at least ``count``
        examples; its cursor is put back when the generator finishes or is closed, so a pass over them (support
        scores, the whitened init's inputs) consumes no data."""
        batcher = batcher or self.batcher
        saved_cursor = Cursor(batcher.cursor.epoch, batcher.cursor.position)
        try:
            seen = 0
            while seen < count:
                batch = batcher.next()
                yield batch
                seen += batch["input_ids"].shape[0]
        finally:
            batcher.cursor = saved_cursor

    def _select_support(self) -> dict[str, Any]:
        start = time.perf_counter()
        groups = self._memory_groups({n: layer.out_features * layer.in_features for n, layer in self.layers.items()})
        ctx = SupportContext(
            shapes={n: (layer.out_features, layer.in_features) for n, layer in self.layers.items()},
            nnz={n: b.nnz for n, b in self.budgets.items()},
            base_weight=lambda n: self.layers[n].dense_base(),
            scores=self._gradient_scores,
            groups=groups,
            seed=self.cfg.seed + 1,
            adapter=self.cfg.adapter,
        )
        supports: dict[str, CSRSupport] = SUPPORT_RULES.get(self.support_rule)(ctx)
        for n, s in supports.items():
            self.layers[n].set_support(self.cfg.adapter, s)
        set_active_adapters(self.model, self.cfg.adapter)
        return {"rule": self.support_rule, "seconds": time.perf_counter() - start, "passes": len(groups),
                "nnz": sum(s.nnz for s in supports.values())}  # fmt: skip

    # ------------------------------------------------------------------------------------------ state

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        a = self.cfg.adapter
        tensors = ckpt.rng_state()
        for n, layer in self.layers.items():
            if a in layer.lora_A:
                tensors[f"{n}.A"], tensors[f"{n}.B"] = layer.lora_A[a], layer.lora_B[a]
            if a in layer.sparse_values:
                s = layer.supports[a]
                tensors[f"{n}.S"], tensors[f"{n}.row_ptr"], tensors[f"{n}.col_idx"] = (
                    layer.sparse_values[a], s.row_ptr, s.col_idx)  # fmt: skip
        opt_tensors, opt_scalars = ckpt.optimizer_state(self.optimizer, self._param_names())
        tensors.update(opt_tensors)
        meta = {
            "phase": self.state.phase, "step": self.state.step, "global_step": self.state.global_step,
            "tokens": self.state.tokens, "cursor": [self.batcher.cursor.epoch, self.batcher.cursor.position],
            **({"kl_cursor": [self.kl_batcher.cursor.epoch, self.kl_batcher.cursor.position]} if self.kl_batcher
               else {}),
            "optimizer_scalars": opt_scalars, "config": self.cfg.to_dict(),
            "sparse_in_optimizer": len(self.optimizer.param_groups) > 1 or not any(
                a in layer.lora_A for layer in self.layers.values()),
        }  # fmt: skip
        return tensors, meta

    def restore(self, path: Path) -> None:
        tensors, meta = ckpt.load_checkpoint(path, trainer=self)  # checked against this run before any use
        a = self.cfg.adapter
        for n, layer in self.layers.items():
            if f"{n}.A" in tensors:
                layer.lora_A[a].data.copy_(tensors[f"{n}.A"])
                layer.lora_B[a].data.copy_(tensors[f"{n}.B"])
            if f"{n}.S" in tensors:
                rp, ci = tensors[f"{n}.row_ptr"].to(self.device), tensors[f"{n}.col_idx"].to(self.device)
                from sparsepack.layers.adapter_linear import csr_row_idx

                support = CSRSupport(rp, ci, csr_row_idx(rp), (layer.out_features, layer.in_features))
                layer.set_support(a, support, tensors[f"{n}.S"].to(self.device).clone())
        if any(layer.has_adapter(a) for layer in self.layers.values()):
            set_active_adapters(self.model, a)
        self._build_optimizer(with_sparse=meta["sparse_in_optimizer"])
        ckpt.load_optimizer_state(self.optimizer, self._param_names(), tensors, meta["optimizer_scalars"])
        self.state.phase, self.state.step = meta["phase"], meta["step"]
        self.state.global_step, self.state.tokens = meta["global_step"], meta["tokens"]
        self.batcher.cursor = Cursor(*meta["cursor"])
        if self.kl_batcher is not None:
            self.kl_batcher.cursor = Cursor(*meta["kl_cursor"])
        ckpt.set_rng_state(tensors)
        if self.metrics_path is not None:  # rows after the checkpoint are logged again by this run
            ckpt.trim_metrics(self.metrics_path, self.state.global_step)

    def _save(self) -> None:
        if self.ckpt_dir is None:
            return
        tensors, meta = self.state_tensors()
        ckpt.save_checkpoint(self.ckpt_dir, self.state.global_step, tensors, meta)

    def _log(self, row: dict[str, Any]) -> None:
        self.state.history.append(row)
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------------------------------ run

    def evaluate(self) -> float | None:
        if self.eval_windows is None:
            return None
        from sparsepack.pipeline.evaluate import perplexity

        was_training = self.model.training
        res = perplexity(self.model, self.eval_windows, batch_size=self.cfg.batch_size, progress=False)
        self.model.train(was_training)
        return res.perplexity

    def run(self, resume_from: Path | None = None) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        if resume_from is not None:
            self.restore(resume_from)
        else:
            self._build_optimizer(with_sparse=not self.method.lowrank)
        start = time.perf_counter()
        bar = tqdm(total=sum(p.steps for p in self.phases), initial=self.state.global_step, desc="finetune",
                   unit="step", disable=not self.progress)  # fmt: skip
        while self.state.phase < len(self.phases):
            phase = self.phases[self.state.phase]
            if phase.name == "select":
                self.model.train()
                summary["selection"] = self.residual_summary if self.cfg.residual_support else self._select_support()
                # restart: A/B as the warm-up left them, fresh optimizer and schedule for both parts;
                # continue: keep A/B's optimizer state and add the sparse values to it.
                old = self.optimizer
                self._build_optimizer(with_sparse=True)
                if self.cfg.schedule == "continue" and old is not None:
                    for p, st in old.state.items():
                        self.optimizer.state[p] = st
                self.state.phase += 1
                self.state.step = 0
                continue
            self.model.train()
            while self.state.step < phase.steps:
                t0 = time.perf_counter()
                tokens_before = self.state.tokens
                loss = self._train_step(phase)
                self.state.step += 1
                self.state.global_step += 1
                dt = time.perf_counter() - t0
                row = {"step": self.state.global_step, "phase": phase.name, "loss": loss,
                       "lr": self.optimizer.param_groups[0]["lr"], "seconds": dt,
                       "tokens_per_s": (self.state.tokens - tokens_before) / dt}  # fmt: skip
                if self.cfg.eval_every and self.state.global_step % self.cfg.eval_every == 0:
                    row["eval_ppl"] = self.evaluate()
                self._log(row)
                bar.update(1)
                bar.set_postfix(phase=phase.name, loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if self.cfg.save_every and self.state.global_step % self.cfg.save_every == 0:
                    if self.state.step == phase.steps:  # checkpoint at a phase boundary: resume at the next
                        self.state.phase += 1
                        self.state.step = 0
                        self._save()
                        self.state.phase -= 1
                        self.state.step = phase.steps
                    else:
                        self._save()
            self.state.phase += 1
            self.state.step = 0
        bar.close()
        self.model.eval()
        summary.update({"steps": self.state.global_step, "tokens": self.state.tokens,
                        "seconds": time.perf_counter() - start,
                        "final_loss": self.state.history[-1]["loss"] if self.state.history else None})  # fmt: skip
        ppl = self.evaluate()
        if ppl is not None:
            summary["eval_ppl"] = ppl
        return summary
