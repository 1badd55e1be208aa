"""Memory of token-level KD through the LM heads: materialised logits vs `chunked_token_divergence`.

    PYTHONPATH=. python benchmarks/token_kd_memory.py
    PYTHONPATH=. python benchmarks/token_kd_memory.py --vocabs=32768,131072 --tokens=8192 \
        --student_hidden=1024 --teacher_hidden=1024 --divergence=forward_kl

For `jax.value_and_grad` (w.r.t. the student's hidden states, LM-head kernel and bias) of the
masked mean token loss `masked_mean(values, mask)`, float32, it prints the per-device bytes that
XLA's memory analysis reports (`jax.jit(f).lower(*args).compile().memory_analysis()`: temp,
argument and output sizes) for two ways of computing `values`:
  unchunked = `token_divergence(h_s @ W_s + b_s, h_t @ W_t + b_t)` on materialised `[N, V]` logits;
  chunked   = `chunked_token_divergence(h_s, W_s, b_s, h_t, W_t, b_t)` (token × vocabulary blocks).
Compile only: the arguments are `jax.ShapeDtypeStruct`s and nothing is run or allocated.
"""
import argparse
import functools

import jax
import jax.numpy as jnp

from kd_jax.losses import chunked_token_divergence, masked_mean, token_divergence
import results_log  # benchmarks/, the script's folder

GIB = 2.0 ** 30


def _unchunked(hs, ws, bs, ht, wt, bt, **hparams):
  return token_divergence(hs @ ws + bs, ht @ wt + bt, **hparams)


def memory(values_fn, tokens, vocab, student_hidden, teacher_hidden):
  """(temp, argument, output) bytes of the jitted value-and-grad of the masked mean loss."""
  def loss(hs, ws, bs, ht, wt, bt, mask):
    return masked_mean(values_fn(hs, ws, bs, ht, wt, bt), mask)

  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  args = (f32((tokens, student_hidden)), f32((student_hidden, vocab)), f32((vocab,)),
          f32((tokens, teacher_hidden)), f32((teacher_hidden, vocab)), f32((vocab,)),
          f32((tokens,)))
  m = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  m = m.memory_analysis()
  return m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--vocabs", default="32768,131072")
  parser.add_argument("--tokens", type=int, default=8192, help="N = batch × sequence length")
  parser.add_argument("--student_hidden", type=int, default=1024)
  parser.add_argument("--teacher_hidden", type=int, default=1024)
  parser.add_argument("--divergence", default="forward_kl")
  parser.add_argument("--token_chunk", type=int, default=1024)
  parser.add_argument("--vocab_chunk", type=int, default=8192)
  flags = parser.parse_args()
  hparams = {"divergence": flags.divergence, "temperature": 1.0}
  methods = {
      "unchunked": functools.partial(_unchunked, **hparams),
      "chunked": functools.partial(chunked_token_divergence, **hparams,
                                   token_chunk=flags.token_chunk, vocab_chunk=flags.vocab_chunk),
  }
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; value_and_grad of the masked mean "
        f"{flags.divergence}, float32, N={flags.tokens} tokens, hidden {flags.student_hidden} "
        f"(student) / {flags.teacher_hidden} (teacher), chunks {flags.token_chunk} tokens x "
        f"{flags.vocab_chunk} vocabulary")
  print("| V | method | temp GiB | argument GiB | output GiB | total GiB |")
  print("|---|---|---|---|---|---|")
  for vocab in (int(v) for v in flags.vocabs.split(",")):
    for name, fn in methods.items():
      sizes = memory(fn, flags.tokens, vocab, flags.student_hidden, flags.teacher_hidden)
      cells = " | ".join(f"{b / GIB:.3f}" for b in (*sizes, sum(sizes)))
      print(f"| {vocab} | {name} | {cells} |", flush=True)


if __name__ == "__main__":
  with results_log.recorded("Token-level KD memory: materialised LM-head logits vs chunked"):
    main()
