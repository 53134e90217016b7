"""finetune --teacher: residual initialization against a dense SVD reference, KL loss against a direct
computation, teacher checks, resume bit for bit with a teacher."""

import pytest
import torch

import sparsepack
from sparsepack.config import TrainConfig
from sparsepack.methods.residual import residual_init
from sparsepack.pipeline import trainer as trainer_mod
from sparsepack.pipeline.finetune import TeacherMismatchError, finetune
from sparsepack.pipeline.trainer import kl_to_teacher
from tests.factories import rtn_pack, run_interrupted, save_hf, tiny_llama
from tests.test_finetune import adapter_tensors


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    model = tiny_llama()
    rtn_pack(model, d / "pack", bits=3)  # 3-bit: a residual large enough to matter
    save_hf(model, d / "hf")
    save_hf(tiny_llama(intermediate_size=96), d / "other")
    lines = [f"def function_{i}(x): return x * {i} + sum(range({i % 7})) # the quick brown fox" for i in range(300)]
    (d / "c.txt").write_text("\n".join(lines))
    return d


def cfg_for(env, **kw):
    base = dict(data=str(env / "c.txt"), adapter="a1", rank=4, density=0.05, steps=3, warmup_steps=1, batch_size=2,
                grad_accum=1, seqlen=32, mask_samples=2, lr=5e-3, lr_lowrank=5e-3, teacher=str(env / "hf"))  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def dense_reference(w_fp, w_q, rank, nnz, scaling):
    """The residual init written directly: dense top-k mask, torch SVD of the remainder, rank-r truncation."""
    r = (w_fp - w_q).double()
    mask = torch.zeros(r.numel(), dtype=torch.bool)
    mask[r.abs().flatten().argsort(descending=True)[:nnz]] = True
    mask = mask.view_as(r)
    sparse = torch.where(mask, r, torch.zeros_like(r))
    U, S, Vh = torch.linalg.svd(r - sparse)
    return sparse, U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def test_residual_init_equals_dense_svd_reference_and_reduces_error():
    gen = torch.Generator().manual_seed(0)
    w_fp = torch.randn(48, 40, generator=gen)
    w_q = (w_fp * 4).round() / 4  # a coarse grid: the residual is the rounding error
    w_q[3, 5] += 2.0  # an outlier the sparse part must take
    rank, nnz, scaling = 3, 30, 16 / 3
    init = residual_init(w_fp, w_q, rank, nnz, scaling)
    s = init.support
    sparse = torch.zeros(48, 40, dtype=torch.float64)
    sparse[s.row_idx.long(), s.col_idx.long()] = init.values.double()
    lowrank = scaling * (init.B.double() @ init.A.double())
    ref_sparse, ref_lowrank = dense_reference(w_fp, w_q, rank, nnz, scaling)
    torch.testing.assert_close(sparse, ref_sparse, rtol=0, atol=1e-6)
    torch.testing.assert_close(lowrank, ref_lowrank, rtol=1e-4, atol=1e-5)
    assert sparse[3, 5] != 0
    err_zero = torch.linalg.norm(w_fp - w_q)
    err_sparse = torch.linalg.norm(w_fp.double() - (w_q.double() + sparse))
    err_full = torch.linalg.norm(w_fp.double() - (w_q.double() + sparse + lowrank))
    assert err_full < err_sparse < err_zero
    # A and B carry the singular values evenly
    torch.testing.assert_close(init.A.norm(dim=1), init.B.norm(dim=0), rtol=1e-4, atol=1e-6)


def set_up_trainer(env, init):
    """A Trainer on the 3-bit pack with the fp teacher, set up (initialized) with ``--init init``."""
    from sparsepack.formats.tokenizer import load_tokenizer

    model = sparsepack.load(env / "pack")
    teacher = sparsepack.load(env / "hf")
    tr = trainer_mod.Trainer(model, load_tokenizer(env / "pack"), cfg_for(env, init=init, init_samples=2),
                             [(torch.arange(8), torch.arange(8))], None, progress=False, teacher=teacher)  # fmt: skip
    tr.setup()
    return tr, teacher


def test_residual_init_on_a_pack_reduces_every_layers_error(env):
    tr, teacher = set_up_trainer(env, "residual")
    assert [p.name for p in tr.phases] == ["select", "train"]  # the support comes from the residual: no warm-up
    for n, layer in tr.layers.items():
        w_fp = teacher.get_submodule(n).weight
        w_q = layer.dense_base()
        corrected = w_q + layer.delta_weight("a1")
        assert layer.supports["a1"].nnz == tr.budgets[n].nnz
        assert torch.linalg.norm(w_fp - corrected) < 0.97 * torch.linalg.norm(w_fp - w_q), n


def test_residual_lowrank_init_fits_the_whole_residual_and_leaves_the_support_to_the_method(env, tmp_path):
    from sparsepack.methods.residual import svd_factors

    tr, teacher = set_up_trainer(env, "residual-lowrank")
    assert [p.name for p in tr.phases] == ["warmup", "select", "train"]  # RoSA's own schedule chooses S
    for n, layer in tr.layers.items():
        assert "a1" not in layer.supports, n
        w_fp, w_q = teacher.get_submodule(n).weight, layer.dense_base()
        A, B, err2, total2 = svd_factors(w_fp - w_q, tr.budgets[n].rank, layer.scaling["a1"])  # the whole residual
        torch.testing.assert_close(layer.lora_A["a1"].data, A)
        torch.testing.assert_close(layer.lora_B["a1"].data, B)
        got2 = float(torch.linalg.norm((w_fp - w_q - layer.delta_weight("a1")).double()) ** 2)
        assert got2 == pytest.approx(err2, rel=1e-3) and err2 < total2
    # end to end: the Fisher rule picks the support after the warm-up, values start at zero and train
    res = finetune(env / "pack", tmp_path / "o", cfg_for(env, init="residual-lowrank", kl_weight=0), progress=False)
    assert res.summary["selection"]["passes"] > 0  # gradient passes, where a residual support takes none
    t = adapter_tensors(tmp_path / "o")
    assert any(k.endswith("values") for k in t) and all(v.abs().sum() > 0 for k, v in t.items() if k.endswith("values"))


def test_whitened_factors_reach_the_weighted_optimum_and_beat_the_plain_svd_on_the_inputs():
    from sparsepack.methods.residual import svd_factors, whitened_factors

    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(24, 32, generator=gen, dtype=torch.float64)
    # inputs that mostly live in a few directions, as a transformer's do
    scales = torch.logspace(0, -2, 32, dtype=torch.float64)
    X = torch.randn(200, 32, generator=gen, dtype=torch.float64) * scales
    gram, rank, scaling, damp = X.T @ X, 4, 2.0, 0.01
    A, B, err2, total2 = whitened_factors(delta, gram, rank, scaling, damp)
    H = gram + damp * gram.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(H)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T  # H^(1/2): any square root has the same singular values
    sigma = torch.linalg.svdvals(delta @ root)
    C = scaling * B.double() @ A.double()
    got2 = float(torch.linalg.norm((delta - C) @ root) ** 2)
    assert got2 == pytest.approx(float((sigma[rank:] ** 2).sum()), rel=1e-4)  # Eckart-Young in the weighted norm
    assert err2 == pytest.approx(got2, rel=1e-4) and total2 == pytest.approx(float((sigma**2).sum()), rel=1e-6)
    Ap, Bp, _, _ = svd_factors(delta, rank, scaling)
    plain = scaling * Bp.double() @ Ap.double()
    assert torch.linalg.norm((delta - C) @ X.T) < 0.9 * torch.linalg.norm((delta - plain) @ X.T)
    with pytest.raises(ValueError, match="does not match 32 input features"):
        whitened_factors(delta, gram[:8, :8], rank)


def test_residual_whitened_init_fits_each_layers_output_error_on_the_teachers_inputs(env):
    from sparsepack.methods.residual import svd_factors, whitened_factors

    tr, teacher = set_up_trainer(env, "residual-whitened")
    assert [p.name for p in tr.phases] == ["warmup", "select", "train"]
    assert (tr.batcher.cursor.epoch, tr.batcher.cursor.position) == (0, 0)  # calibration consumed no data
    xs = {}
    handles = [teacher.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: xs.__setitem__(n, a[0].detach().double().reshape(-1, a[0].shape[-1]))) for n in tr.layers]
    with torch.no_grad():
        teacher(input_ids=torch.arange(8)[None].repeat(2, 1))  # the one example, twice: one batch of init_samples
    for h in handles:
        h.remove()
    for n, layer in tr.layers.items():
        assert "a1" not in layer.supports, n
        R = teacher.get_submodule(n).weight.detach() - layer.dense_base()
        A, B, _, _ = whitened_factors(R, xs[n].T @ xs[n], tr.budgets[n].rank, layer.scaling["a1"])
        torch.testing.assert_close(layer.lora_A["a1"].data, A, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.lora_B["a1"].data, B, rtol=1e-4, atol=1e-5)
        # on those inputs it leaves less output error than the plain SVD of the residual
        Ap, Bp, _, _ = svd_factors(R, tr.budgets[n].rank, layer.scaling["a1"])
        s = layer.scaling["a1"]
        whitened = torch.linalg.norm((R - layer.delta_weight("a1")).double() @ xs[n].T)
        assert whitened < torch.linalg.norm((R - s * Bp @ Ap).double() @ xs[n].T), n


def test_kl_loss_equals_direct_computation():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(2, 7, 11, generator=gen, requires_grad=True)
    t = torch.randn(2, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 7), generator=gen)
    labels[0, :3] = -100  # prompt tokens
    labels[1, 5:] = -100  # padding
    got = kl_to_teacher(s, t, labels)
    total, count = 0.0, 0
    for b in range(2):
        for pos in range(6):
            if labels[b, pos + 1] == -100:
                continue
            p = torch.softmax(t[b, pos].double(), -1)
            q = torch.softmax(s[b, pos].double(), -1)
            total += float((p * (p.log() - q.log())).sum().detach())
            count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)
    got.backward()
    assert s.grad[0, 0].abs().sum() == 0 and s.grad[0, 2].abs().sum() > 0  # untrained positions get no gradient


def test_teacher_loss_adds_kl_to_lm_loss(env):
    cfg = cfg_for(env, kl_weight=0.5, method="lora", dropout=0.0)  # residual init: B != 0, so no random dropout
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import completion_examples

    tok = load_tokenizer(env / "pack")
    model, teacher = sparsepack.load(env / "pack"), sparsepack.load(env / "hf")
    examples = completion_examples(tok, cfg.data, cfg.seqlen)
    tr = trainer_mod.Trainer(model, tok, cfg, examples, None, progress=False, teacher=teacher)
    tr.setup()
    batch = tr.batcher.next()
    with torch.no_grad():
        got = tr._loss(batch)
        lm = model(**batch).loss
        kl = kl_to_teacher(model(**batch).logits, teacher(**batch).logits, batch["labels"])
    assert kl > 0
    torch.testing.assert_close(got, lm + 0.5 * kl)


def test_kl_data_puts_the_kl_term_on_its_own_batches(env):
    """--kl-data: LM loss on the training batch + weight * KL on a batch of the KL source, each from its own
    cursor; support scoring borrows both without consuming them."""
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import completion_examples

    (env / "kl.txt").write_text("\n".join(f"a different text, line {i}: {i * i}" for i in range(200)))
    cfg = cfg_for(env, kl_weight=0.5, kl_data=str(env / "kl.txt"), dropout=0.0)
    tok = load_tokenizer(env / "pack")
    model, teacher = sparsepack.load(env / "pack"), sparsepack.load(env / "hf")
    examples = completion_examples(tok, cfg.data, cfg.seqlen)
    kl_examples = completion_examples(tok, cfg.kl_data, cfg.seqlen)
    tr = trainer_mod.Trainer(model, tok, cfg, examples, None, progress=False, teacher=teacher,
                             kl_examples=kl_examples)  # fmt: skip
    tr.setup()
    tr._build_optimizer(with_sparse=False)
    tr._gradient_scores("fisher", list(tr.layers)[:2])  # borrows batches of both sources
    assert (tr.batcher.cursor.position, tr.kl_batcher.cursor.position) == (0, 0)
    batch, kl_batch = tr.batcher.next(), tr.kl_batcher.next()
    assert not torch.equal(batch["input_ids"], kl_batch["input_ids"])
    with torch.no_grad():
        got = tr._loss(batch, kl_batch)
        lm = model(**batch).loss
        kl = kl_to_teacher(model(**kl_batch).logits, teacher(**kl_batch).logits, kl_batch["labels"])
        same_tokens = kl_to_teacher(model(**batch).logits, teacher(**batch).logits, batch["labels"])
    assert kl > 0 and not torch.isclose(kl, same_tokens)
    torch.testing.assert_close(got, lm + 0.5 * kl)
    tr.state.step = 0
    tr._train_step(tr.phases[-1])  # one micro-batch of each source per accumulation step
    assert (tr.batcher.cursor.position, tr.kl_batcher.cursor.position) == (4, 4)


def test_kl_data_backward_runs_term_by_term_with_the_whole_loss_gradient(env):
    """With --kl-data the LM term's backward runs before the KL batch's forward, so the first forward's
    activations are freed before the second's are built; the gradient equals that of the summed loss."""
    import weakref

    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import completion_examples

    (env / "kl2.txt").write_text("\n".join(f"another text, row {i}: {i * 7}" for i in range(200)))
    cfg = cfg_for(env, kl_weight=0.5, kl_data=str(env / "kl2.txt"), dropout=0.0, method="lora")
    tok = load_tokenizer(env / "pack")
    model, teacher = sparsepack.load(env / "pack"), sparsepack.load(env / "hf")
    examples, kl_examples = (completion_examples(tok, src, cfg.seqlen) for src in (cfg.data, cfg.kl_data))
    tr = trainer_mod.Trainer(model, tok, cfg, examples, None, progress=False, teacher=teacher,
                             kl_examples=kl_examples)  # fmt: skip
    tr.setup()
    tr._build_optimizer(with_sparse=False)
    batch, kl_batch = tr.batcher.next(), tr.kl_batcher.next()
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]

    tr._loss(batch, kl_batch).backward()  # both terms' graphs at once
    want = [p.grad.clone() for p in params]
    tr.optimizer.zero_grad(set_to_none=True)

    alive = []  # weak references to each student forward's logits, taken as they are made
    hook = model.register_forward_hook(lambda _m, _a, out: alive.append(weakref.ref(out.logits)))
    try:
        terms = tr._loss_terms(batch, kl_batch)
        (next(terms) / 2).backward()
        assert len(alive) == 1
        kl = next(terms)
        assert len(alive) == 2 and alive[0]() is None  # the LM forward's logits are gone before the KL term exists
        (kl / 2).backward()
        assert next(terms, None) is None
    finally:
        hook.remove()
    tr.optimizer.zero_grad(set_to_none=True)
    loss = tr._backward(batch, kl_batch, 2, "test")
    torch.testing.assert_close(loss, float(tr._loss(batch, kl_batch).detach()), rtol=1e-6, atol=0)
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad * 2, w, rtol=1e-5, atol=1e-7)


def test_teacher_samples_are_seeded_full_length_and_leave_the_rng_alone(env):
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.finetune import teacher_samples

    tok = load_tokenizer(env / "hf")
    teacher = sparsepack.load(env / "hf")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = teacher_samples(teacher, tok, 5, 12, seed=3, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    b = teacher_samples(teacher, tok, 5, 12, seed=3, batch_size=2, progress=False)
    c = teacher_samples(teacher, tok, 5, 12, seed=4, batch_size=2, progress=False)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == start).all() and not (a[:, 1:] == tok.eos_token_id).any()
    assert len({tuple(r.tolist()) for r in a}) == 5  # sampled, not greedy: the rows differ


def test_kl_sample_count_defaults_to_a_quarter_of_the_reads_within_bounds(env):
    from sparsepack.pipeline.finetune import kl_sample_count

    # reads = (main steps + warm-up) * batch * grad-accum: the benchmark's 480-step runs read 1920 -> 480 samples
    assert kl_sample_count(cfg_for(env, steps=464, warmup_steps=16, batch_size=4, grad_accum=1), 10) == 480
    assert kl_sample_count(cfg_for(env, steps=144, warmup_steps=16, batch_size=4, grad_accum=1), 10) == 160
    lora = cfg_for(env, method="lora", steps=464, warmup_steps=16, batch_size=4, grad_accum=1)
    assert kl_sample_count(lora, 10) == 464  # no warm-up phase: only the steps the run takes count
    assert kl_sample_count(cfg_for(env, steps=3), 10) == 128  # short runs: the floor
    assert kl_sample_count(cfg_for(env, steps=1000, batch_size=4, grad_accum=8), 10) == 512  # the cap
    # --epochs: steps from the examples (2 epochs of 300 examples at 2 x 1 per step = 300 steps, + 1 warm-up)
    assert kl_sample_count(cfg_for(env, steps=None, epochs=2.0), 300) == (300 + 1) * 2 // 4
    assert kl_sample_count(cfg_for(env, kl_samples=7), 10) == 7  # given: as is
    with pytest.raises(ValueError, match="--kl-samples"):
        cfg_for(env, kl_samples=0)


def test_teacher_must_match_the_pack(env, tmp_path):
    with pytest.raises(TeacherMismatchError, match="intermediate_size"):
        finetune(env / "pack", tmp_path / "o", cfg_for(env, teacher=str(env / "other")), progress=False)
    with pytest.raises(TeacherMismatchError, match="quantized"):
        finetune(env / "pack", tmp_path / "o", cfg_for(env, teacher=str(env / "pack")), progress=False)
    with pytest.raises(ValueError, match="--init residual needs --teacher"):
        cfg_for(env, teacher=None, init="residual")
    with pytest.raises(ValueError, match="--init residual-lowrank needs --teacher"):
        cfg_for(env, teacher=None, init="residual-lowrank")
    for bad in ({"teacher": None, "init": "zero"}, {"kl_weight": 0.0}):
        with pytest.raises(ValueError, match="--kl-data feeds the KL-to-teacher term"):
            cfg_for(env, kl_data="teacher", **bad)
    assert cfg_for(env).residual_init and not cfg_for(env, init="zero").residual_init  # auto: residual with a teacher
    assert not cfg_for(env).residual_support and cfg_for(env, init="residual").residual_support  # auto: low-rank only
    assert not cfg_for(env, teacher=None).residual_init
    # the KL term's data: teacher samples unless asked otherwise; none without a teacher or a weight
    assert cfg_for(env).kl_source == "teacher" and cfg_for(env, kl_data="batch").kl_source is None
    assert cfg_for(env, kl_data="x.txt").kl_source == "x.txt"
    assert cfg_for(env, teacher=None, init="zero").kl_source is None and cfg_for(env, kl_weight=0).kl_source is None
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("init", "kl_data"), [("residual", "batch"), ("zero", "batch"), ("auto", None),
                                               ("residual-whitened", "batch"), ("auto", "teacher"), ("zero", "file")])
def test_resume_with_teacher_is_bit_for_bit(env, tmp_path, monkeypatch, init, kl_data):  # auto: residual-lowrank
    kl = {"file": str(env / "c.txt")}.get(kl_data, kl_data)  # None: auto (teacher samples)
    cfg = cfg_for(env, steps=4, save_every=2, init=init, kl_weight=0.7, kl_data=kl, kl_samples=5)
    finetune(env / "pack", tmp_path / "full", cfg, progress=False)
    expected = adapter_tensors(tmp_path / "full")

    crash_at = 4 if init == "residual" else 5  # after the checkpoint at global step 2 / 4
    run_interrupted(monkeypatch, crash_at, lambda: finetune(env / "pack", tmp_path / "part", cfg, progress=False))
    finetune(env / "pack", tmp_path / "part", cfg, resume=True, progress=False)
    got = adapter_tensors(tmp_path / "part")
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_dropped_lowrank_matches_autograd_reference():
    from sparsepack.layers.dropout_lowrank import dropped_lowrank, dropped_lowrank_reference, keep_mask

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    torch.manual_seed(5)
    y = dropped_lowrank(x, A, B, 0.5, 0.3)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    torch.manual_seed(5)
    keep = keep_mask(torch.empty(15, 12), 0.3).view(3, 5, 12)  # the same draw
    assert 0 < keep.sum() < keep.numel()
    assert abs(keep_mask(torch.empty(200_000), 0.3).float().mean().item() - 0.7) < 0.005  # keeps 1 - p
    ref = dropped_lowrank_reference(x, A, B, 0.5, keep, 0.3)
    torch.testing.assert_close(y, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, (x, A, B), dy), strict=True):
        torch.testing.assert_close(g, r)


def test_cli_kl_data_teacher(env, tmp_path):
    import json

    from click.testing import CliRunner

    from sparsepack.cli import main

    args = ["finetune", str(env / "pack"), "--data", str(env / "c.txt"), "--rank", "2", "--density", "0.02",
            "--steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--seqlen", "16",
            "--mask-samples", "2", "--kl-data", "teacher", "--kl-samples", "3", "--json"]  # fmt: skip
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "o"), "--teacher", str(env / "hf")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["kl_examples"] == 3
    bad = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "--kl-data feeds the KL-to-teacher term" in bad.output
    assert not (tmp_path / "o2").exists()
