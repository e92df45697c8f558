"""The planner against XLA's TPU compiler, without chips: libtpu describes a v5p-8 (4 devices), the
trainer's own step (plan.lower_train_step) is compiled ahead of time for it, and

* the planner's per-device total agrees with XLA's peak (arguments + temporaries + outputs not aliased
  to a donated argument) within 10%, for one generation and one understanding step at small widths
  (multiples of 128, TPU's lane width: narrower arrays are padded in HBM and the figures would
  measure the padding); the understanding step at 1024 tokens with model.attention = splash and xla,
  whose (L, L) float32 scores the planner counts for xla only (plan.attention_scores);
* XLA's compiled FLOPs (``cost_analysis``) of a reduced model agree with ``model.step_flops`` within
  10%. cost_analysis counts a scanned stack's body once, so every stack has one layer (its scan runs
  once: the body's count is the stack's), and ``model.remat=none`` (no recomputation).

Skipped, with the reason, when libtpu is not installed (requirements-dev.txt pins it). Full-size
plans are benchmarks/tpu_plans.py, not tests."""

import pytest

from blip3o_jax import plan, sharding
from blip3o_jax.models import blip3o as model_lib
from tests.references.configs import demo_config

SLICE = "v5p-8"
TOPOLOGY, REASON = plan.tpu_topology(SLICE)
pytestmark = pytest.mark.skipif(TOPOLOGY is None, reason=f"no TPU topology ({REASON}); {plan.LIBTPU_HINT}")


def small_config(stage: str, layers: int, **overrides):
    """The demo's components at widths of 128-512, bfloat16 compute, frozen parts in bfloat16."""
    cfg = demo_config(**{"train.stage": stage, "data.global_batch_size": 8, "data.max_length": 256,
                         "model.dtype": "bfloat16", "model.remat": "full", **overrides})
    m = cfg.model
    m.llm.update(dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(16, 24, 24)))
    m.vision.update(dict(depth=layers, hidden_size=256, num_heads=2, intermediate_size=512, out_hidden_size=512,
                         window_size=112, fullatt_block_indexes=(0,)))
    m.eva.update(dict(image_size=128, patch_size=8, width=256, layers=layers, head_width=128, mlp_ratio=2.0,
                      pooling="early_pool2d_4"))
    m.dit.update(dict(input_size=4, in_channels=256, dim=512, n_layers=layers, n_heads=4, n_kv_heads=4,
                      multiple_of=128, latent_embedding_size=512))
    m.pad_token_id, m.image_pad_token_id, m.vision_start_token_id, m.vision_end_token_id = 2000, 2001, 2002, 2003
    m.gen_start_token_id, m.query_token_id = 2004, 2005
    cfg.data.image_size = 128
    cfg.data.und_image_size = 224  # 16x16 patches, 64 image tokens
    cfg.sharding.update(dict(llm="fsdp", vision="fsdp", dit="fsdp", target="fsdp"))
    return cfg


# Generation on an fsdp mesh. Understanding data-parallel: at these widths GSPMD lays the trained
# LLM's activations out with their hidden axis over fsdp and the batch over data only (measured in the
# compiled HLO), a layout the planner (batch over data x fsdp) does not model and full-size meshes do
# not get (benchmarks/tpu_plans.py compiles 8B understanding on fsdp meshes).
MESHES = {"generation": dict(data=2, fsdp=2, tensor=1), "understanding": dict(data=4, fsdp=1, tensor=1)}
CASES = [("generation", {}),
         ("understanding", {"data.max_length": 1024, "model.attention": "splash"}),
         ("understanding", {"data.max_length": 1024, "model.attention": "xla"})]


@pytest.mark.parametrize("stage,overrides", CASES, ids=["generation", "understanding-splash", "understanding-xla"])
def test_planner_total_agrees_with_xla_peak(stage, overrides):
    cfg = small_config(stage, layers=4, **overrides)
    mesh = MESHES[stage]
    xla = plan.compile_train_step(cfg, stage, sharding.make_mesh(mesh, TOPOLOGY.devices))
    p = plan.make_plan(cfg, mesh, SLICE, stage=stage)
    diff = (p.bytes_total - xla["peak_bytes"]) / xla["peak_bytes"]
    print(stage, overrides, "XLA", {k: v for k, v in xla.items() if k.endswith("bytes")}, "planner", p.to_dict(),
          f"{diff:+.1%}")
    assert abs(diff) <= 0.10, (stage, p.bytes_total, xla["peak_bytes"])


@pytest.mark.parametrize("stage", ["generation", "understanding"])
def test_compiled_flops_match_step_flops(stage):
    cfg = small_config(stage, layers=1, **{"model.remat": "none"})
    xla = plan.compile_train_step(cfg, stage, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                                  TOPOLOGY.devices[:1]))
    analytic = model_lib.step_flops(cfg, stage, 0)
    print(stage, "compiled", xla["flops"], "analytic", analytic, f"{analytic / xla['flops'] - 1:+.1%}")
    assert abs(analytic - xla["flops"]) <= 0.10 * xla["flops"], (xla["flops"], analytic)
