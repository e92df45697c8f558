"""Embedded demo: tiny BLIP3-o trained end to end on synthetic shapes, on a CPU, with no downloads.

    python -m blip3o_jax.train --config configs/demo.py --workdir runs/demo      (= make demo)
    python -m blip3o_jax.train --config configs/demo.py:smoke --workdir runs/smoke  (every stage, tiny step counts)

Every component exists at toy size (Qwen2.5-VL backbone, 2-layer ViT, DiT head, EVA-style target
encoder) and runs the paper's stages on synthetic coloured-shape images with captions and questions.
The last stage writes DIR/report.json (colour/shape/position accuracy of generated images and
understanding accuracy) and a grid of samples.
"""

from blip3o_jax import configlib


def get_config(arg: str | None = None):
    c = configlib.base_config()
    m = c.model
    m.llm.update(dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                      tie_word_embeddings=False))
    # Untied (the released 7B's setting; the 3B ties): with a tied head, the understanding loss pulls the
    # embeddings of answers the tiny model confuses together, "left"/"right" and "top"/"bottom" to cosine
    # 0.986, and the generation conditions of such prompts then nearly coincide. Measured (held-out,
    # n = 192): tied, position questions 36/62 (Zen 4); untied 62/62 and those cosines 0.62 / 0.56 (Zen 3),
    # and the whole demo on Zen 3: understanding 0.99, generation colour / shape / position 1.0 / 0.87 / 1.0.
    m.vision.update(dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, window_size=56,
                         fullatt_block_indexes=(1,), out_hidden_size=64))
    m.eva.update(dict(image_size=64, patch_size=8, width=64, layers=2, head_width=16, mlp_ratio=2.0,
                      pooling="early_pool2d_2"))
    m.dit.update(dict(input_size=4, in_channels=64, dim=96, n_layers=2, n_heads=4, n_kv_heads=4,
                      multiple_of=32, latent_embedding_size=64))
    m.siglip2.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          patch_size=8, num_patches=64, image_size=64, num_pooled_tokens=16))
    # Pixel-space decoder (no VAE): EVA tokens -> 32x32 RGB, the same UNet class as the SDXL-layout one,
    # run on 2x2 space-to-depth pixels (16x16x12): XLA's CPU convolutions are slow (BENCHMARKS.md), and a
    # quarter of the positions makes a training step about 4x cheaper.
    m.decoder.update(dict(sample_size=16, in_channels=12, out_channels=12, block_out_channels=(32, 64),
                          layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                          attention_head_dim=(2, 4), cross_attention_dim=64, addition_time_embed_dim=16,
                          projection_class_embeddings_input_dim=64 + 6 * 16, norm_num_groups=8))
    c.demo.decoder_pixel_patch = 2
    m.n_query = 16
    # At the reference's std 1 the queries swamp what the tiny backbone's attention brings from the prompt
    # (condition states then differ by ~0.05% between prompts); at its embeddings' scale they differ ~20x more.
    m.query_init_std = 0.02
    # Special tokens live at the top of the demo's own tiny vocabulary.
    m.pad_token_id, m.image_pad_token_id, m.vision_start_token_id, m.vision_end_token_id = 1000, 1001, 1002, 1003
    m.gen_start_token_id, m.query_token_id = 1004, 1005
    m.dtype = "float32"
    m.remat = "none"
    c.sharding.update(dict(llm="replicated", vision="replicated", dit="replicated", target="replicated"))
    c.data.global_batch_size = 16
    c.data.max_length = 120  # a one-object understanding sample: its questions, its caption, a prompt restated
    c.data.image_size = 64
    c.data.und_image_size = 64  # -> 56 px for the ViT: 4x4 patches, 4 image tokens
    c.data.max_turns = 0  # all turns (synthetic.make_sample: canonical order for half the samples)
    c.train.stage = "pipeline"
    # The vision tower comes out of the target stage already reading colour, shape and position; the
    # understanding stage then trains the LLM only (measured: 0.90 held-out accuracy vs 0.42 with the ViT
    # trained too, whose features the early language-model gradients scramble).
    c.train.freeze_vision_tower = True
    # Generation trains the DiT on a fixed condition: the queries stay at their random init and the
    # training sequence is the inference prompt. Measured (DiT samples vs per-combo feature centroids,
    # colour / shape / position): trained queries 0.56 / 0.42 / 0.94 (they collapse onto the position
    # words); frozen 0.65 / 0.58 / 0.63, as the reference's training prompt (closed empty assistant turn)
    # gives this tiny backbone query states 1.7x their across-prompt spread away from the inference ones;
    # frozen + inference prompt 0.81 / 0.92 / 1.0 after 1500 steps, 0.96 / 0.85 / 1.0 after 2000. The LLM
    # then runs forward only: 0.074 s per step instead of 0.12 s. Later, on an AMD machine (other float
    # results, another backbone): 2000 steps at lr 1e-3 0.85 / 0.88 / 0.75; 4000 at 1e-3 1.0 / 0.94 / 0.79;
    # 4000 at 2e-3 1.0 / 0.96 / 0.88 (3e-3 0.85, 6000 steps 0.75 position; trained queries 0.81 at 2x
    # the time). Every position error was top vs bottom, prompts whose query states were 1.0 apart (41
    # long): the condition, not the DiT; the restate turn of synthetic.make_sample now lists the prompt's
    # words in a random order (3.6 apart; with it 1.0 / 1.0 / 0.88).
    c.train.freeze_latent_queries = True
    c.data.generation_prompt = "inference"
    c.demo.update(dict(target_steps=600, understanding_steps=1800, generation_steps=4000,
                       generation_learning_rate=2e-3))
    # Held-out sizes of the report: 192 each, so a 0.05 margin is several standard errors (at p = 0.9 one
    # standard error is 0.022); the 48 prompt combinations are each generated 4 times with other noise.
    c.demo.update(dict(eval_questions=192, eval_prompts=192))
    # The decoder trains in a background thread during understanding + generation (demo.py). Measured,
    # autoencoding 48 held-out pictures (shape accuracy; colour and position >= 0.92 in all): 600 steps at
    # lr 1e-3 0.38, 1500 steps 0.69; 600 steps at lr 3e-3 0.54 (6e-3 diverges); on the AMD machine 900
    # steps at 3e-3 0.69, 1500 steps 0.92 (circles read as squares are most of the rest). On Zen 3 after the
    # ViT ran images as a batch (same math, other rounding, another target encoder): 1500 steps 0.79 (96
    # pictures; the generated images' shape accuracy was the same 0.79), 2000 steps 0.97.
    c.demo.update(dict(decoder_steps=2000, decoder_learning_rate=3e-3))
    # The report's decoder sampling steps: 20 and 50 read the same (shape 0.792 both, 96 pictures, 1500-step
    # decoder); 20 takes 2.5x fewer UNet calls.
    c.demo.eval_decoder_steps = 20
    c.train.num_steps = 2000
    c.train.learning_rate = 1e-3
    c.train.min_learning_rate = 1e-4
    c.train.warmup_ratio = 0.02
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    if arg == "smoke":
        c.train.log_every = 5
        c.demo.update(dict(target_steps=10, understanding_steps=10, generation_steps=10, decoder_steps=10,
                           eval_questions=4, eval_prompts=4))
        c.flow.sample_steps = 4
    elif arg:
        raise ValueError(f"configs/demo.py: unknown argument {arg!r}; allowed: '', 'smoke'")
    return c
