"""The PyTorch rows of tools/bench_moe.py: transformers' MixtralSparseMoeBlock (torch:mixtral)
and a plain SwiGLU of hidden k*F (torch:ffn(k*F)), timed on the same inputs as the JAX rows.

torch and transformers are optional: without them the rows say n/a. A sibling module of the
tool, imported as `bench_moe_torch`.
"""

import bench_common

try:
  import torch
except ImportError:
  torch = None
try:
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
except ImportError:
  MixtralSparseMoeBlock = None

NO_LORA = 'n/a (--lora: no torch LoRA block here)'


def time_block(block, x_np, ct_np, dtype, device, iters, warmup, forward_only=False):
  """Returns (median ms, min ms) of `loss = sum(block(x) * ct); loss.backward()` on `device`
  (of `block(x)` under no_grad with `forward_only`)."""
  block = block.to(device=device, dtype=dtype).train()
  x = torch.from_numpy(x_np).to(device=device, dtype=dtype).requires_grad_(True)
  ct = torch.from_numpy(ct_np).to(device=device, dtype=dtype)
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def step():
    if forward_only:
      with torch.no_grad():
        block(x)
      sync()
      return
    for p in (x, *block.parameters()):
      p.grad = None
    out = block(x)
    y = out[0] if isinstance(out, tuple) else out
    (y.float() * ct.float()).sum().backward()
    sync()

  return bench_common.median_min_ms(step, iters, warmup)


class TorchSwiGLU(torch.nn.Module if torch is not None else object):
  """wo(silu(wi_0 x) * wi_1 x), no biases."""

  def __init__(self, d, f):
    super().__init__()
    self.wi_0, self.wi_1 = (torch.nn.Linear(d, f, bias=False) for _ in range(2))
    self.wo = torch.nn.Linear(f, d, bias=False)

  def forward(self, x):
    return self.wo(torch.nn.functional.silu(self.wi_0(x)) * self.wi_1(x))


def normal_init(block):
  with torch.no_grad():
    for p in block.parameters():  # transformers 5 creates Mixtral's with torch.empty.
      p.normal_(0.0, 0.02)
  return block


def torch_mixtral(d, f, e, k, experts_impl):
  cfg = MixtralConfig(
      hidden_size=d,
      intermediate_size=f,
      num_local_experts=e,
      num_experts_per_tok=k,
      router_jitter_noise=0.0,
  )
  cfg._experts_implementation = experts_impl  # pylint: disable=protected-access
  return normal_init(MixtralSparseMoeBlock(cfg))


def jobs(shape, x_np, ct_np, args):
  """bench_moe's torch_mixtral and torch_ffn jobs for one shape (tokens, embed, mlp, experts,
  top-k): each a callable returning ((ms, min ms), None, note), or an 'n/a' string."""
  _, d, f, e, k = shape
  if args.lora:
    return {'torch_mixtral': NO_LORA, 'torch_ffn': NO_LORA}
  if torch is None:
    return {name: 'n/a (torch not installed)' for name in ('torch_mixtral', 'torch_ffn')}
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[args.dtype]
  timer = lambda block: time_block(
      block, x_np, ct_np, dtype, device, args.iters, args.warmup, args.forward_only
  )
  return {
      'torch_mixtral': (
          'n/a (transformers not installed)'
          if MixtralSparseMoeBlock is None
          else lambda: (
              timer(torch_mixtral(d, f, e, k, args.torch_experts)),
              None,
              f'experts_implementation={args.torch_experts}',
          )
      ),
      'torch_ffn': lambda: (timer(normal_init(TorchSwiGLU(d, k * f))), None, ''),
  }


def empty_cache() -> None:
  """Frees torch's cached GPU memory between rows, so JAX's allocator is not starved."""
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()


def device_note() -> str:
  """Where the torch rows run, for the table's header."""
  if torch is None:
    return 'n/a (torch not installed)'
  if torch.cuda.is_available():
    return f'cuda ({torch.cuda.get_device_name(0)}), torch {torch.__version__}'
  return f'cpu ({torch.get_num_threads()} threads), torch {torch.__version__}'
