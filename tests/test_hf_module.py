"""capture="dynamo" keeps the user's Hugging Face model: class and methods kept, eager == compiled,
Trainer trains and resumes, generate before and after convert, save/reload round trip, PEFT LoRA.

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


def test_lotion_buffers_live_beside_original_keys() -> None:
    model = tiny()
    keys = set(model.state_dict())
    prepared = lotion_fx.prepare(model, cfg(), capture="dynamo")
    added = set(prepared.state_dict()) - keys
    linears = [n for n, m in prepared.named_modules() if isinstance(m, LotionLinear)]
    assert added == {f"{n}.lotion.{b}" for n in linears for b in ("g", "count")}
    assert keys <= set(prepared.state_dict())


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
    loss = fwd(x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    return loss.item(), grads


def test_eager_equals_compiled_inductor_and_aot_eager() -> None:
    torch._dynamo.reset()
    runs = {}
    for backend in (None, "inductor", "aot_eager"):
        model = lotion_fx.prepare(tiny(), cfg(curvature_scale=64.0), capture="dynamo")
        fwd = model if backend is None else torch.compile(model, backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = [_step(model, fwd, ids(seed=s), opt) for s in range(3)]  # step 0 fills g, then penalty
        runs[backend] = (steps, dict(model.named_buffers()), float(lotion_fx.penalty(model)))
    e_steps, e_bufs, e_pen = runs[None]
    assert e_pen > 0
    for backend in ("inductor", "aot_eager"):
        steps, bufs, pen = runs[backend]
        for (le, ge), (lc, gc) in zip(e_steps, steps):
            assert math.isclose(le, lc, rel_tol=1e-5)
            for n in ge:
                torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-6)
        for n in e_bufs:
            torch.testing.assert_close(bufs[n], e_bufs[n], rtol=1e-4, atol=1e-10)
        assert math.isclose(pen, e_pen, rel_tol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_is_invisible_to_the_smoothers(reentrant: bool) -> None:
    x = ids()
    for method, state in (("lotion", "count"), ("lotion_sampled", "step")):
        models = []
        for ckpt in (False, True):
            model = lotion_fx.prepare(tiny(), cfg(method), capture="dynamo")
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.train()
            for _ in range(2):
                model(x, labels=x).loss.backward()
            models.append(model)
        plain, ckpt = models
        for name, sm in lotion_fx.smoothers(ckpt).items():
            # recomputation neither counts a step twice nor redraws the stochastic rounding
            assert int(getattr(sm, state)) == 2
            torch.testing.assert_close(ckpt.get_parameter(name).grad, plain.get_parameter(name).grad,
                                       rtol=1e-5, atol=1e-8)
            if method == "lotion":
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


def test_trainer_trains_saves_and_resumes_to_the_same_step(tmp_path) -> None:
    pytest.importorskip("accelerate")
    from safetensors import safe_open

    a = lotion_fx.prepare(tiny(), cfg(), capture="dynamo")
    trainer = transformers.Trainer(model=a, args=_args(tmp_path / "a"), train_dataset=_Windows())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    sm = lotion_fx.smoothers(a)["model.layers.0.mlp.up_proj.weight"]
    assert int(sm.count) == 4 and float(sm.g.abs().max()) > 0
    with safe_open(str(tmp_path / "a" / "checkpoint-2" / "model.safetensors"), "pt") as f:
        assert int(f.get_tensor("model.layers.0.mlp.up_proj.lotion.count")) == 2

    b = lotion_fx.prepare(tiny(), cfg(), capture="dynamo")
    trainer = transformers.Trainer(model=b, args=_args(tmp_path / "b"), train_dataset=_Windows())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # the resumed run reaches the same weights and curvature state as the straight one
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)


def test_trainer_torch_compile_matches_eager(tmp_path) -> None:
    pytest.importorskip("accelerate")
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):  # aot_eager: the Trainer path; Inductor is checked above
        model = lotion_fx.prepare(tiny(), cfg(), capture="dynamo")
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = transformers.Trainer(model=model, train_dataset=_Windows(), args=_args(
            tmp_path / str(compiled), max_steps=3, save_strategy="no", **extra))
        trainer.train()
        assert (trainer.model_wrapped is not model) == compiled  # Trainer really compiled it
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], model.state_dict()))
    (le, se), (lc, sc) = runs
    assert len(le) == 3 and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(le, lc))
    for k in se:
        torch.testing.assert_close(sc[k], se[k], rtol=1e-4, atol=1e-8, msg=k)
    assert int(lotion_fx.smoothers(model)["lm_head.weight"].count) == 3
    report = lotion_fx.audit(model)  # the kept model has no graph: the audit reports without a diff
    assert report.capture == "dynamo" and len(report.layers) == LINEARS_PER_LAYER + 1 and report.diff is None


def test_trainer_bf16_gradient_checkpointing(tmp_path) -> None:
    pytest.importorskip("accelerate")
    model = lotion_fx.prepare(tiny(), cfg(), capture="dynamo")
    trainer = transformers.Trainer(model=model, train_dataset=_Windows(), args=_args(
        tmp_path, max_steps=2, save_strategy="no", bf16=True, gradient_checkpointing=True))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(int(sm.count) == 2 for sm in lotion_fx.smoothers(model).values())
    assert all(sm.g.dtype == torch.float32 for sm in lotion_fx.smoothers(model).values())


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
    assert deployed is model and type(deployed.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor"
    lotion_fx.release(deployed)  # drop training state: exactly the original classes and keys
    assert set(deployed.state_dict()) == keys and type(deployed.lm_head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(deployed(x).logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(deployed, x), want_tokens)

    # the converted model round-trips through a plain state_dict
    torch.save(deployed.state_dict(), tmp_path / "model.pt")
    fresh = type(plain)(plain.config).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"), assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, deployed(x).logits)
    # and through safetensors, with torchao's flattening of its tensor subclasses
    from safetensors.torch import load_file, safe_open, save_file
    from torchao.prototype.safetensors.safetensors_support import (
        flatten_tensor_state_dict,
        unflatten_tensor_state_dict,
    )

    data, meta = flatten_tensor_state_dict({k: v.data for k, v in deployed.state_dict().items()})
    save_file(data, str(tmp_path / "model.safetensors"), metadata=meta)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    restored, leftover = unflatten_tensor_state_dict(load_file(str(tmp_path / "model.safetensors")), meta)
    assert not leftover
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
    assert len(loaded) == 2 * (LINEARS_PER_LAYER + 1)
    sa, sb = model.state_dict(), reloaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert float(lotion_fx.penalty(reloaded)) == float(lotion_fx.penalty(model)) > 0

    other = lotion_fx.prepare(tiny(), cfg("lotion_sampled"), capture="dynamo")
    with pytest.raises(KeyError, match="lacks 8 smoother buffers"):
        lotion_fx.load_smoother_state(other, tmp_path)


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
    deployed = lotion_fx.release(lotion_fx.convert(merged))
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
    best = records[0]["best"]
    assert records[0]["sample"].startswith("def ")
    saved = tmp_path / f"{best}-int4"
    fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(saved))
    fresh.load_state_dict(torch.load(saved / "model.pt"), assign=True)  # the documented reload
    assert type(fresh.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert (tmp_path / f"{best}-trained" / "model.safetensors").is_file()
