"""serve/generate.py over the engine: greedy decoding equals HF `generate`; slots, the KV cache,
sampling, stops, streaming and a sharded mesh change nothing they should not."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import vlm
from tests import hf_models as H
from serve.generate import Generator, bucket
from serve.prompt import Prompt, build_prompt, image_inputs
from serve.sampling import SamplingParams
from tests.tiny_ckpt import shared_llava_checkpoint
from vlm import sharding

IMG = 95
N = 10
NO_EOS = dict(eos_token_id=None, pad_token_id=0)  # HF runs to max_new_tokens, logits untouched
GREEDY = SamplingParams(max_tokens=N, stop_token_ids=())
LOGPROBS = GREEDY.replace(logprobs=True, top_logprobs=20)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  ref = H.build(T.LlamaForCausalLM, H.llama_config(**NO_EOS), path)
  model, params = vlm.from_pretrained(str(path))
  return ref, model, params


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  path = tmp_path_factory.mktemp("llava")
  cfg = T.LlavaConfig(vision_config=H.clip_config(), text_config=H.llama_config(**NO_EOS),
                      image_token_index=IMG, vision_feature_layer=-2)
  ref = H.build(T.LlavaForConditionalGeneration, cfg, path)
  model, params = vlm.from_pretrained(str(path))
  return ref, Generator(model, params)


def hf_greedy(ref, ids, n=N, **kw):
  x = torch.tensor(ids[None])  # an explicit mask: HF would mask prompt tokens equal to pad
  with torch.no_grad():
    out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                       **kw)
  return out[0, len(ids):].numpy()


def llava_prompts(rng, lengths):
  """Image-first prompts (4 placeholders) of the given total lengths with float pixels."""
  out = []
  for n in lengths:
    ids = np.concatenate([H.rand_ids(rng, (1,), 96, avoid=(IMG,)), np.full(4, IMG),
                          H.rand_ids(rng, (n - 5,), 96, avoid=(IMG,))]).astype(np.int32)
    out.append(Prompt(ids, rng.normal(size=(1, 28, 28, 3)).astype(np.float32)))
  return out


def test_greedy_llama_matches_hf_and_cache_matches_full_forward(llama):
  ref, model, params = llama
  gen = Generator(model, params)
  rng = np.random.default_rng(0)
  prompts = [H.rand_ids(rng, (n,), 96).astype(np.int32) for n in (8, 13, 3)]
  want = [hf_greedy(ref, p) for p in prompts]  # HF runs each row alone, unpadded
  batched = gen.generate([Prompt(p) for p in prompts], LOGPROBS)
  for w, got in zip(want, batched):
    np.testing.assert_array_equal(got.tokens, w)
    assert got.finish_reason == "length"
  [alone] = gen.generate([Prompt(prompts[0])], GREEDY, slots=1)
  np.testing.assert_array_equal(alone.tokens, want[0])
  # Every step's logprobs (the chosen token's and the top 20) are the log-softmax of a full
  # forward over prompt + generated tokens (rows right padded to one length: causal attention
  # keeps the padding out of earlier positions).
  seqs = [np.concatenate([p, g.tokens]) for p, g in zip(prompts, batched)]
  width = max(map(len, seqs))
  full = np.asarray(jax.nn.log_softmax(jax.jit(lambda x: model.apply({"params": params}, x))(
      jnp.asarray([np.pad(s, (0, width - len(s))) for s in seqs]))))
  for p, s, g, f in zip(prompts, seqs, batched, full):
    ref = f[len(p) - 1:len(s) - 1]
    assert len(g.logprobs) == N
    for t, lp, r in zip(g.tokens, g.logprobs, ref):
      assert lp.token == t and abs(lp.logprob - r[t]) <= 1e-4
      ids, vals = zip(*lp.top)
      np.testing.assert_allclose(vals, np.sort(r)[::-1][:20], atol=1e-4)
      np.testing.assert_allclose(r[list(ids)], vals, atol=1e-4)
  # The same batch with params and rows split over a (data 2, fsdp 2, tensor 2) mesh, in the
  # stacked layout and in the per-layer one (GPU default) with its tuple of cache buffers.
  mesh = sharding.make_mesh((2, 2, 2))
  sharded = Generator(model, params, mesh=mesh, scan_layers=True)
  kernel = sharded.params["llm"]["layers"]["layer"]["mlp"]["gate"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (2, 16, 32)  # fsdp x tensor split
  for w, got in zip(want, sharded.generate([Prompt(p) for p in prompts], GREEDY)):
    np.testing.assert_array_equal(got.tokens, w)
  unstacked = Generator(model, params, mesh=mesh, scan_layers=False)
  kernel = unstacked.params["llm"]["layers_1"]["layer"]["mlp"]["gate"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (16, 32)
  assert "layers" not in unstacked.params["llm"]
  for w, b, got in zip(want, batched, unstacked.generate([Prompt(p) for p in prompts],
                                                         LOGPROBS)):
    np.testing.assert_array_equal(got.tokens, w)
    assert max(abs(x.logprob - y.logprob) for x, y in zip(got.logprobs, b.logprobs)) <= 1e-5


def test_stop_tokens_match_hf(llama):
  ref, model, params = llama
  gen = Generator(model, params)
  p = H.rand_ids(np.random.default_rng(1), (6,), 96).astype(np.int32)
  free = hf_greedy(ref, p)
  stop = int(free[3])
  want = hf_greedy(ref, p, eos_token_id=stop)
  k = int(np.flatnonzero(free == stop)[0])
  np.testing.assert_array_equal(want[:k + 1], free[:k + 1])
  [got] = gen.generate([Prompt(p)], SamplingParams(max_tokens=N, stop_token_ids=(stop,)))
  # HF keeps the stop token in its output; ours ends just before it.
  np.testing.assert_array_equal(got.tokens, want[:k])
  assert got.finish_reason == "stop" and want[k] == stop


def test_greedy_llava_matches_hf_batched(llava):
  ref, gen = llava
  rng = np.random.default_rng(2)
  prompts = llava_prompts(rng, (9, 13, 6, 11))
  want = []
  for p in prompts:
    with torch.no_grad():
      ids = torch.tensor(p.ids[None])
      out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                         do_sample=False, pixel_values=torch.tensor(p.pixels).permute(0, 3, 1, 2))
    want.append(out[0, len(p.ids):].numpy())
  for g, w in zip(gen.generate(prompts, GREEDY), want):
    np.testing.assert_array_equal(g.tokens, w)


def test_buckets_reuse_programs(llava):
  _, gen = llava
  rng = np.random.default_rng(3)
  gen.generate(llava_prompts(rng, (9, 13, 6)), GREEDY, slots=4)
  [engine] = gen._engines.values()
  compiled = set(engine.prog.compiled)
  # Other lengths, row counts and max_tokens inside the same buckets: nothing recompiles.
  gen.generate(llava_prompts(rng, (7, 16, 10, 12)), GREEDY.replace(max_tokens=N - 3), slots=4)
  gen.generate(llava_prompts(rng, (11,)), GREEDY, slots=4)
  assert len(gen._engines) == 1 and set(engine.prog.compiled) == compiled
  assert [bucket(n) for n in (1, 5, 8, 9, 128, 129, 1024 + 256)] == [8, 8, 8, 16, 128, 256, 1280]


def test_sampling_seeded_and_filtered(llava):
  _, gen = llava
  prompts = llava_prompts(np.random.default_rng(4), (9, 12, 14))
  hot = SamplingParams(max_tokens=N, temperature=1.5, seed=7, stop_token_ids=())
  a, b = gen.generate(prompts, hot, slots=4), gen.generate(prompts, hot, slots=4)
  c = gen.generate(prompts, hot.replace(seed=8), slots=4)
  assert all((x.tokens == y.tokens).all() for x, y in zip(a, b))
  assert any((x.tokens != y.tokens).any() for x, y in zip(a, c))
  # no seed: a fresh one per request (#23: repeated requests were silent duplicates)
  fresh = [gen.generate(prompts[:1], hot.replace(seed=None), slots=4)[0].tokens for _ in range(3)]
  assert len({tuple(t) for t in fresh}) > 1
  greedy = gen.generate(prompts, GREEDY, slots=4)
  for filt in ({"top_k": 1}, {"top_p": 1e-6}):
    one = gen.generate(prompts, hot.replace(**filt), slots=4)
    assert all((x.tokens == y.tokens).all() for x, y in zip(one, greedy))


def test_stream_and_stop_strings():
  gen = Generator.from_checkpoint(shared_llava_checkpoint())
  img = np.random.default_rng(5).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
  prompt = build_prompt(gen.config, gen.tokenizer, "What is shown in the image?", [img])
  free_cfg = SamplingParams(max_tokens=24, stop_token_ids=())
  [free] = gen.generate([prompt], free_cfg)
  pieces = []
  [streamed] = gen.generate([prompt], free_cfg, stream=lambda row, d: pieces.append((row, d)))
  assert streamed.text == free.text and len(pieces) > 1
  assert {r for r, _ in pieces} == {0} and "".join(d for _, d in pieces) == free.text
  # A stop string taken from the middle of the free answer cuts it there (and in the stream).
  word = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
  assert word.strip(), free.text
  want = free.text[:free.text.index(word)].strip()
  pieces.clear()
  [cut] = gen.generate([prompt], free_cfg.replace(stop=(word,), logprobs=True),
                       stream=lambda row, d: pieces.append(d))
  assert cut.text == want and cut.finish_reason == "stop"
  assert "".join(pieces) == want
  # the answer's tokens are those its text needs: none of the stop string's own (#23: usage
  # counted the tokens past it)
  k = len(cut.tokens)
  np.testing.assert_array_equal(cut.tokens, free.tokens[:k])
  raw = lambda t: gen.tokenizer.decode(t.tolist(), skip_special_tokens=True)
  assert raw(cut.tokens).strip().startswith(want) and word not in raw(cut.tokens[:k - 1])
  assert len(raw(free.tokens[:k + 1])) > len(raw(cut.tokens)) and len(cut.logprobs) == k


@pytest.mark.slow  # ~10 s: a third model shape to compile, and HF's generate
def test_bench_smoke(capsys):
  """bench/generate.py runs end to end on tiny shapes: both sides generate every token."""
  from bench import generate as bench
  bench.main(["--smoke"])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| jax |") or
          line.startswith("| hf (dynamic cache) |")]
  assert len(rows) == 2 and all(" - |" not in r for r in rows), out
  bench.main(["--smoke", "--json", "--impl", "hf"])  # the per-process mode of a GPU run
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert res["batch"] == 2 and res["decode_tok_s"] > 0
  bench.main(["--smoke", "--impl", "jax", "--layout", "scan", "--xla-flags", "base"])
  out = capsys.readouterr().out
  assert "| jax (scan layers) [base] | 2 |" in out and " - |" not in out, out


def test_bench_xla_flag_set_reaches_its_child(capsys):
  """--xla-flags: each set runs our side in a child with those XLA_FLAGS (an unknown flag aborts
  that child alone, and its row says so under the set's label)."""
  from bench import generate as bench
  bench.main(["--smoke", "--impl", "jax", "--xla-flags", "bad=--xla_no_such_flag=1"])
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("| jax [bad] | 2 |"))
  assert "Unknown flag in XLA_FLAGS: --xla_no_such_flag=1" in row


@pytest.mark.slow  # ~8 s: compiles the anyres vision path
def test_greedy_llava_next_anyres_matches_hf(tmp_path):
  """Images of different aspect ratios (different tile grids and placeholder counts) in one batch,
  prepared by serve.prompt.image_inputs as chat and eval do."""
  cfg = T.LlavaNextConfig(vision_config=H.clip_config(), text_config=H.llama_config(**NO_EOS),
                          image_token_index=IMG, image_grid_pinpoints=[[28, 56], [56, 28],
                                                                       [56, 56], [84, 28]])
  ref = H.build(T.LlavaNextForConditionalGeneration, cfg, tmp_path)
  model, params = vlm.from_pretrained(str(tmp_path))
  v = model.config.vision
  rng = np.random.default_rng(6)
  prompts, want = [], []
  for hw in [(60, 25), (30, 70)]:
    px, size, n = image_inputs(model.config, rng.integers(0, 256, hw + (3,), dtype=np.uint8))
    ids = np.concatenate([H.rand_ids(rng, (2,), 96, avoid=(IMG,)), np.full(n, IMG),
                          H.rand_ids(rng, (4,), 96, avoid=(IMG,))]).astype(np.int32)
    prompts.append(Prompt(ids, px[None], np.asarray([size], np.int32)))
    norm = ((px / 255.0 - np.asarray(v.mean)) / np.asarray(v.std)).astype(np.float32)
    x = torch.tensor(ids[None])
    with torch.no_grad():
      out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False,
                         pixel_values=torch.tensor(norm).permute(0, 3, 1, 2)[None],
                         image_sizes=torch.tensor([size[:2]]))
    want.append(out[0, len(ids):].numpy())
  assert len(prompts[0].ids) != len(prompts[1].ids)
  for g, w in zip(Generator(model, params).generate(prompts, GREEDY, slots=2), want):
    np.testing.assert_array_equal(g.tokens, w)


def test_dtype_sets_the_compute_and_cache_dtype():
  """--dtype of serve / serve.chat / vqa run: the model computes in it (Runtime), the cache is
  kept in it; the saved config has no say (it holds the architecture alone)."""
  plain = Generator.from_checkpoint(shared_llava_checkpoint())
  bf16 = Generator.from_checkpoint(shared_llava_checkpoint(), dtype="bfloat16")
  assert (plain.model.runtime.dtype, plain.cache_dtype) == ("float32", jnp.float32)
  assert (bf16.model.runtime.dtype, bf16.cache_dtype) == ("bfloat16", jnp.bfloat16)
  assert bf16.config == plain.config
