"""capture="dynamo" keeps the user's Hugging Face model: class and methods kept, eager == compiled,
Trainer trains and resumes (LotionTrainer for the default curvature), generate before and after
convert, save/reload round trip, PEFT LoRA.

Tiny random-init Llama / Qwen2 configs (no download); CPU.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import lotion_fx
from lotion_fx import reference as R
from lotion_fx.hf_trainer import labelled_logits
from lotion_fx.module_capture import LotionLinear

transformers = pytest.importorskip("transformers")

VOCAB = 128
LINEARS_PER_LAYER = 7  # q k v o gate up down


def tiny(kind: str = "llama", layers: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))


def cfg(method: str = "lotion", **kw) -> lotion_fx.LotionConfig:
    return lotion_fx.LotionConfig(method=method, format="int4", block_size=32, beta=0.9, **kw)


def ids(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_model_kept_keys_kept_and_qat_forward_matches_reference(kind: str) -> None:
    model = tiny(kind)
    plain = copy.deepcopy(model)
    keys = set(model.state_dict())
    params = dict(model.named_parameters())
    prepared = lotion_fx.prepare(model, cfg("qat"), capture="dynamo")

    assert prepared is model and type(prepared) is type(plain) and hasattr(prepared, "generate")
    assert dict(prepared.named_parameters()).keys() == params.keys()
    assert all(prepared.get_parameter(n) is p for n, p in params.items())  # same Parameter objects
    linears = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == LINEARS_PER_LAYER + 1  # + lm_head
    assert set(lotion_fx.smoothers(prepared)) == {f"{n}.weight" for n in linears}
    # qat keeps no state but its config: the original keys plus one `lotion.config_json` per Linear
    assert set(prepared.state_dict()) - keys == {f"{n}.lotion.config_json" for n in linears}
    assert lotion_fx.prepared_info(prepared).capture == "dynamo"

    # train mode, qat: the forward is the plain model with RTN(w) in every Linear (plain torch reference)
    x = ids()
    with torch.no_grad():
        for n in linears:
            w = plain.get_submodule(n).weight
            w.copy_(R.fake_quantize(w, "int4", 32))
        want = plain(x, labels=x).loss
    got = prepared(x, labels=x).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert all(p.grad is not None for p in prepared.parameters())


@pytest.mark.parametrize("method, curvature, g_dtype", [("lotion", "gn_sampled", torch.bfloat16),
                                                        ("lotion", "ema", torch.float32),
                                                        ("lotion_sampled", "gn_sampled", None)])
def test_lotion_buffers_live_beside_original_keys(method: str, curvature: str, g_dtype) -> None:
    model = tiny()
    keys = set(model.state_dict())
    prepared = lotion_fx.prepare(model, cfg(method, curvature=curvature), capture="dynamo")
    added = set(prepared.state_dict()) - keys
    linears = [n for n, m in prepared.named_modules() if isinstance(m, LotionLinear)]
    bufs = ("config_json", "lam_now", "steps", "g", "count") if method == "lotion" else ("config_json", "step")
    assert added == {f"{n}.lotion.{b}" for n in linears for b in bufs}
    assert keys <= set(prepared.state_dict())
    if g_dtype is not None:
        assert all(sm.g.dtype == g_dtype for sm in lotion_fx.smoothers(prepared).values())


def test_bad_input() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"unknown capture 'torchscript'.*'auto', 'fx', 'export', 'dynamo'"):
        lotion_fx.prepare(model, cfg(), capture="torchscript")
    with pytest.raises(ValueError, match="needs no example_inputs"):
        lotion_fx.prepare(model, cfg(), (ids(),), capture="dynamo")
    with pytest.raises(ValueError, match="capture='export' needs example_inputs"):
        lotion_fx.prepare(model, cfg(), capture="export")
    assert not any(isinstance(m, LotionLinear) for m in model.modules())  # errors changed nothing
    prepared = lotion_fx.prepare(model, cfg())  # auto: a PreTrainedModel gets "dynamo"
    assert prepared is model
    with pytest.raises(ValueError, match="already prepared"):
        lotion_fx.prepare(model, cfg(), capture="dynamo")
    lotion_fx.release(model)  # then it can be prepared again
    assert not lotion_fx.is_prepared(model) and type(model.lm_head) is nn.Linear
    lotion_fx.prepare(model, cfg("qat"), capture="dynamo")

    no_linear = nn.Sequential(nn.Embedding(4, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="no Linear weight"):
        assert lotion_fx.prepare(no_linear, cfg(), capture="dynamo") is no_linear
    shared = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    shared[1].weight = shared[0].weight
    with pytest.raises(ValueError, match="weight of two nn.Linear layers"):
        lotion_fx.prepare(shared, cfg(), capture="dynamo")
    assert type(shared[0]) is nn.Linear


def _step(model: nn.Module, fwd, x: torch.Tensor, opt: torch.optim.Optimizer) -> tuple[float, dict]:
    """One optimizer step of the documented loop: curvature_step (gn_sampled: refreshes g; every
    curvature: advances lam), then forward, backward, step."""
    lotion_fx.curvature_step(fwd, x, labels=x)  # labels: the training call's signature, no recompile
    loss = fwd(x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize("curvature", ["gn_sampled", "ema"])
def test_eager_equals_compiled_inductor_and_aot_eager(curvature: str) -> None:
    torch._dynamo.reset()
    # ema: g folds in the backward op (step 0 fills it, then penalty); gn_sampled: curvature_step
    # refreshes g before every step (curvature_every=1), the penalty at full lam from the start
    extra = dict(curvature_scale=64.0) if curvature == "ema" else dict(curvature_every=1, lam_warmup=0)
    # g in bf16 is written with stochastic rounding: a last-bit difference of the compiled logits can
    # move an element by one bf16 step
    g_tol = dict(rtol=1e-4, atol=1e-10) if curvature == "ema" else dict(rtol=1e-2, atol=1e-10)
    # (gn_sampled under aot_eager: test_trainer_torch_compile_matches_eager)
    backends = (None, "inductor", "aot_eager") if curvature == "ema" else (None, "inductor")
    runs = {}
    for backend in backends:
        model = lotion_fx.prepare(tiny(), cfg(curvature=curvature, **extra), capture="dynamo")
        fwd = model if backend is None else torch.compile(model, backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = [_step(model, fwd, ids(seed=s), opt) for s in range(3)]
        runs[backend] = (steps, dict(model.named_buffers()), float(lotion_fx.penalty(model)))
    e_steps, e_bufs, e_pen = runs[None]
    assert e_pen > 0
    assert all(int(sm.count) == 3 and int(sm.steps) == 3 for sm in lotion_fx.smoothers(model).values())
    for backend in backends[1:]:
        steps, bufs, pen = runs[backend]
        for (le, ge), (lc, gc) in zip(e_steps, steps):
            assert math.isclose(le, lc, rel_tol=1e-5)
            for n in ge:
                torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-6)
        for n in e_bufs:
            tol = g_tol if n.endswith(".g") else dict(rtol=1e-4, atol=1e-10)
            torch.testing.assert_close(bufs[n], e_bufs[n], **tol, msg=n)
        assert math.isclose(pen, e_pen, rel_tol=1e-3)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_is_invisible_to_the_smoothers(reentrant: bool) -> None:
    x = ids()
    # ema updates g inside the backward that checkpointing reruns; gn_sampled refreshes it in
    # curvature_step (its autograd.grad needs non-reentrant checkpointing, transformers' default)
    cases = [("lotion", dict(curvature="ema"), "count"), ("lotion_sampled", {}, "step")]
    if not reentrant:
        cases.append(("lotion", dict(curvature_every=1, lam_warmup=0), "count"))
    for method, extra, state in cases:
        models = []
        for ckpt in (False, True):
            model = lotion_fx.prepare(tiny(), cfg(method, **extra), capture="dynamo")
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.train()
            for _ in range(2):
                lotion_fx.curvature_step(model, x)
                model(x, labels=x).loss.backward()
            models.append(model)
        plain, ckpt = models
        for name, sm in lotion_fx.smoothers(ckpt).items():
            # recomputation neither counts a step twice nor redraws the stochastic rounding
            assert int(getattr(sm, state)) == 2, (name, extra)
            torch.testing.assert_close(ckpt.get_parameter(name).grad, plain.get_parameter(name).grad,
                                       rtol=1e-5, atol=1e-8)
            if method == "lotion":
                assert float(sm.g.abs().max()) > 0
                torch.testing.assert_close(sm.g, lotion_fx.smoothers(plain)[name].g, rtol=1e-5, atol=1e-12)


class _Windows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seq: int = 16) -> None:
        self.x = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                save_strategy="steps", save_steps=2, use_cpu=True, report_to=[], logging_steps=1,
                seed=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def _trainer(model: nn.Module, args, lotion: bool = True, **kw):
    """LotionTrainer (curvature_step once per optimizer step) or plain transformers.Trainer."""
    cls = lotion_fx.hf_trainer.LotionTrainer if lotion else transformers.Trainer
    return cls(model=model, args=args, train_dataset=_Windows(), **kw)


def _default_cfg(**kw) -> lotion_fx.LotionConfig:
    return lotion_fx.LotionConfig(format="int4", block_size=32, **kw)  # library defaults otherwise


# (config, LotionTrainer?, g refreshes after 4 steps, and after the 2 steps of checkpoint-2)
RESUME_CASES = {
    "default": (_default_cfg, True, 1, 1),  # gn_sampled, curvature_every=10: a refresh at step 0
    "gn_every2": (lambda: _default_cfg(curvature_every=2, lam_warmup=2), True, 2, 1),  # one after resume
    "ema": (lambda: cfg(curvature="ema"), False, 4, 2),  # in the backward: plain Trainer suffices
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_trainer_trains_saves_and_resumes_to_the_same_step(case: str, tmp_path) -> None:
    pytest.importorskip("accelerate")
    from safetensors import safe_open

    make_cfg, lotion, count, count_at_2 = RESUME_CASES[case]
    a = lotion_fx.prepare(tiny(), make_cfg(), capture="dynamo")
    g0 = {n: sm.g.clone() for n, sm in lotion_fx.smoothers(a).items()}
    trainer = _trainer(a, _args(tmp_path / "a"), lotion)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    for n, sm in lotion_fx.smoothers(a).items():
        assert int(sm.count) == count and int(sm.steps) == (4 if lotion else 0), n
        assert not torch.equal(sm.g, g0[n]) and float(sm.g.abs().max()) > 0, n
    assert float(lotion_fx.penalty(a)) > 0
    with safe_open(str(tmp_path / "a" / "checkpoint-2" / "model.safetensors"), "pt") as f:
        assert int(f.get_tensor("model.layers.0.mlp.up_proj.lotion.count")) == count_at_2
        assert int(f.get_tensor("model.layers.0.mlp.up_proj.lotion.steps")) == (2 if lotion else 0)

    b = lotion_fx.prepare(tiny(), make_cfg(), capture="dynamo")
    trainer = _trainer(b, _args(tmp_path / "b"), lotion)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # the resumed run reaches the same weights and curvature state as the straight one
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)


def test_trainer_without_lotion_trainer_has_no_curvature(tmp_path) -> None:
    """The default curvature needs curvature_step: a plain Trainer trains, but LOTION acts as PTQ."""
    pytest.importorskip("accelerate")
    model = lotion_fx.prepare(tiny(), _default_cfg(), capture="dynamo")
    _trainer(model, _args(tmp_path, max_steps=2, save_strategy="no"), lotion=False).train()
    assert all(int(sm.count) == 0 and int(sm.steps) == 0 for sm in lotion_fx.smoothers(model).values())
    assert float(lotion_fx.penalty(model)) == 0


def test_lotion_trainer_once_per_optimizer_step_with_accumulation(tmp_path) -> None:
    pytest.importorskip("accelerate")
    model = lotion_fx.prepare(tiny(), _default_cfg(curvature_every=1, grad_accum_steps=2), capture="dynamo")
    calls = []
    trainer = _trainer(model, _args(tmp_path, max_steps=2, save_strategy="no", per_device_train_batch_size=2,
                                    gradient_accumulation_steps=2))
    step_fn = trainer.lotion_curvature_step
    trainer.lotion_curvature_step = lambda m, inputs: calls.append(inputs["input_ids"].shape) or step_fn(m, inputs)
    trainer.train()
    assert calls == [(2, 16), (2, 16)]  # 2 optimizer steps of 2 micro-batches: one call each
    assert all(int(sm.count) == 2 and int(sm.steps) == 2 for sm in lotion_fx.smoothers(model).values())

    other = lotion_fx.prepare(tiny(), _default_cfg(), capture="dynamo")  # grad_accum_steps=1
    trainer = _trainer(other, _args(tmp_path, max_steps=1, save_strategy="no", gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2.*grad_accum_steps=1"):
        trainer.train()
    with pytest.raises(TypeError, match="holds no model prepared"):
        _trainer(tiny(), _args(tmp_path, max_steps=1, save_strategy="no")).train()


def test_lotion_trainer_refresh_cuts_inputs_and_labels_alike(tmp_path, monkeypatch) -> None:
    """The refresh runs on the first quarter of the batch (the default curvature_batch_fraction): the
    labels that pick the loss's positions are cut with the inputs, so every labelled position (and only
    those) gets a sampled target."""
    pytest.importorskip("accelerate")
    seen = []
    real = lotion_fx.hf_trainer.labelled_logits

    def spy(out, labels, causal):
        seen.append((tuple(out.logits.shape[:-1]), tuple(labels.shape)))
        return real(out, labels, causal)

    monkeypatch.setattr(lotion_fx.hf_trainer, "labelled_logits", spy)
    model = lotion_fx.prepare(tiny(), _default_cfg(), capture="dynamo")  # fraction 0.25
    _trainer(model, _args(tmp_path, max_steps=1, save_strategy="no", per_device_train_batch_size=8)).train()
    assert seen == [((2, 16), (2, 16))]  # one refresh, on 2 of the 8 sequences, labels alike
    assert all(int(sm.count) == 1 for sm in lotion_fx.smoothers(model).values())


def test_labelled_logits_match_the_causal_lm_loss() -> None:
    """The sampled targets cover exactly the positions of transformers' causal-LM loss."""
    logits = torch.randn(2, 5, VOCAB)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    got = labelled_logits(logits, labels, causal=True)
    want = torch.cat([logits[0, :2], logits[1, :4]])  # position t predicts label t+1, -100 skipped
    assert torch.equal(got, want)
    assert torch.equal(labelled_logits(logits, labels, causal=False), logits[labels != -100])
    assert labelled_logits(logits, None, causal=True) is logits
    cls = torch.randn(2, 3)
    assert torch.equal(labelled_logits(cls, torch.tensor([0, 2]), causal=False), cls)  # sequence classification


def test_import_lotion_fx_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = ("import sys, lotion_fx; assert 'transformers' not in sys.modules; "
            "import lotion_fx.hf_trainer as h; assert 'transformers' not in sys.modules; "
            "assert h.LotionTrainer.__mro__[2].__name__ == 'Trainer'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_trainer_torch_compile_matches_eager(tmp_path) -> None:
    pytest.importorskip("accelerate")
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):  # aot_eager: the Trainer path; Inductor is checked above
        model = lotion_fx.prepare(tiny(), _default_cfg(), capture="dynamo")
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = _trainer(model, _args(tmp_path / str(compiled), max_steps=3, save_strategy="no", **extra))
        trainer.train()
        assert (trainer.model_wrapped is not model) == compiled  # Trainer really compiled it
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], model.state_dict()))
    (le, se), (lc, sc) = runs
    assert len(le) == 3 and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(le, lc))
    for k in se:  # g: bf16 with stochastic rounding, a last-bit change of the logits may move one step
        tol = dict(rtol=1e-2, atol=1e-10) if k.endswith(".g") else dict(rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(sc[k], se[k], **tol, msg=k)
    sm = lotion_fx.smoothers(model)["lm_head.weight"]
    assert int(sm.count) == 1 and int(sm.steps) == 3 and float(sm.g.abs().max()) > 0
    report = lotion_fx.audit(model)  # the kept model has no graph: the audit reports without a diff
    assert report.capture == "dynamo" and len(report.layers) == LINEARS_PER_LAYER + 1 and report.diff is None


@pytest.mark.parametrize("curvature", ["gn_sampled", "ema", "kfac_diag"])
def test_trainer_bf16_gradient_checkpointing(curvature: str, tmp_path) -> None:
    pytest.importorskip("accelerate")
    config = cfg(curvature="ema") if curvature == "ema" else _default_cfg(curvature=curvature)
    model = lotion_fx.prepare(tiny(), config, capture="dynamo")
    trainer = _trainer(model, _args(tmp_path, max_steps=2, save_strategy="no", bf16=True, gradient_checkpointing=True),
                       lotion=curvature != "ema")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # LotionTrainer warns when a weight got no curvature
        warnings.filterwarnings("ignore", message=".*(use_cache|autocast|cpu_amp).*")
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    if curvature == "kfac_diag":  # one refresh: both factors of every Linear saw its x and delta, in fp32
        for name, sm in lotion_fx.smoothers(model).items():
            assert int(sm.count) == 1, name
            for t in (sm.kfac_in, sm.kfac_out):
                assert t.dtype == torch.float32 and bool((t > 0).any()) and bool(torch.isfinite(t).all()), name
        return
    count, dtype = (1, torch.bfloat16) if curvature == "gn_sampled" else (2, torch.float32)
    for sm in lotion_fx.smoothers(model).values():
        assert int(sm.count) == count and float(sm.g.abs().max()) > 0
        assert sm.g.dtype == dtype  # the curvature keeps its own dtype


def _generate(model: nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                          pad_token_id=0, **kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_before_and_after_convert(kind: str, tmp_path) -> None:
    model = tiny(kind)
    plain = copy.deepcopy(model).eval()
    keys = set(model.state_dict())
    prepared = lotion_fx.prepare(model, cfg("qat"), capture="dynamo").eval()
    x = ids(2, 5)
    out = _generate(prepared, x)
    assert out.shape == (2, 11)
    assert torch.equal(out, _generate(plain, x))  # eval: the smoother is the identity
    assert torch.equal(_generate(prepared, x, use_cache=False), out)  # KV cache path agrees

    with lotion_fx.quantized_eval(prepared) as qm, torch.no_grad():
        want_logits = qm(x).logits
        want_tokens = _generate(qm, x)
    deployed = lotion_fx.convert(prepared)
    assert deployed is model and type(deployed.lm_head.weight).__name__ == "LotionPackedTensor"
    # convert released the model: no training state, exactly the original classes and keys
    assert set(deployed.state_dict()) == keys and isinstance(deployed.lm_head, nn.Linear)
    assert not lotion_fx.is_prepared(deployed)
    assert lotion_fx.release(deployed) is deployed and set(deployed.state_dict()) == keys  # again: harmless
    with torch.no_grad():
        torch.testing.assert_close(deployed(x).logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(deployed, x), want_tokens)

    # the converted model round-trips through a plain state_dict
    torch.save(deployed.state_dict(), tmp_path / "model.pt")
    fresh = type(plain)(plain.config).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"), assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, deployed(x).logits)
    # and through safetensors: our packed tensors as inner tensors + metadata (the rest via torchao)
    from lotion_fx.backends import torchao_export

    torchao_export.save_safetensors(deployed.state_dict(), str(tmp_path / "model.safetensors"))
    restored = torchao_export.load_safetensors(str(tmp_path / "model.safetensors"))
    fresh = type(plain)(plain.config).eval()
    fresh.load_state_dict(restored, assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, deployed(x).logits)


def test_save_pretrained_round_trip(tmp_path) -> None:
    model = lotion_fx.prepare(tiny(), cfg(), capture="dynamo")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for s in range(2):
        _step(model, model, ids(seed=s), opt)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_pretrained reports the lotion keys as unused
        reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    reloaded = lotion_fx.prepare(reloaded, cfg(), capture="dynamo")
    assert int(lotion_fx.smoothers(reloaded)["lm_head.weight"].count) == 0
    loaded = lotion_fx.load_smoother_state(reloaded, tmp_path)
    assert len(loaded) == 5 * (LINEARS_PER_LAYER + 1)  # config_json, lam_now, steps, g, count
    sa, sb = model.state_dict(), reloaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert float(lotion_fx.penalty(reloaded)) == float(lotion_fx.penalty(model)) > 0

    other = lotion_fx.prepare(tiny(), cfg("lotion_sampled"), capture="dynamo")
    with pytest.raises(KeyError, match="lacks 8 smoother buffers"):
        lotion_fx.load_smoother_state(other, tmp_path)
    other = lotion_fx.prepare(tiny(), cfg(lam=2.0), capture="dynamo")  # same buffers, another config
    with pytest.raises(ValueError, match=r"another config.*'lam': \(1.0, 2.0\)"):
        lotion_fx.load_smoother_state(other, tmp_path)
    assert int(lotion_fx.smoothers(other)["lm_head.weight"].count) == 0  # left unchanged


def test_peft_lora_on_prepared_model() -> None:
    peft = pytest.importorskip("peft")
    model = lotion_fx.prepare(tiny(), cfg("qat"), capture="dynamo")
    base_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    losses = []
    for _ in range(3):
        loss = lora(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, base_q)  # base frozen
    merged = lora.merge_and_unload()
    assert merged is model and isinstance(merged.model.layers[0].self_attn.q_proj, LotionLinear)
    with lotion_fx.quantized_eval(merged) as qm, torch.no_grad():
        want = qm(x).logits
    deployed = lotion_fx.convert(merged)  # releases the model too
    with torch.no_grad():
        torch.testing.assert_close(deployed(x).logits, want, rtol=1e-5, atol=1e-5)


def test_example_hf_finetune_short_mode(tmp_path, capsys) -> None:
    pytest.importorskip("accelerate")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` without install
    from examples import hf_finetune

    records = hf_finetune.main(["--steps", "4", "--batch", "2", "--seq", "32", "--layers", "1", "--hidden", "64",
                                "--max-bytes", "100000", "--eval-windows", "4", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert [r["method"] for r in records] == list(hf_finetune.METHODS)
    assert all(math.isfinite(r["val_fp"]) and math.isfinite(r["val_quant"]) for r in records)
    assert "| ptq" in printed and "| lotion" in printed and "greedy sample" in printed
    by_method = {r["method"]: r for r in records}
    assert by_method["lotion"]["g_refreshes"] >= 1 and by_method["ptq"]["g_refreshes"] == 0  # LotionTrainer ran it
    best = records[0]["best"]
    assert records[0]["sample"].startswith("def ")
    saved = tmp_path / f"{best}-int4"
    fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(saved))
    fresh.load_state_dict(torch.load(saved / "model.pt"), assign=True)  # the documented reload
    assert type(fresh.lm_head.weight).__name__ == "LotionPackedTensor"
    assert (tmp_path / f"{best}-trained" / "model.safetensors").is_file()
