"""What the transformers comparisons share: the model-shape flags and the reference model."""


def add_shape_args(parser) -> None:
  """The CPU shape of record: 4 layers, d=256, 8 heads, 32x32 (1024 tokens), batch 8."""
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--batch", type=int, default=8)


def transformers_model(args):
  """transformers' ImageGPTForCausalImageModeling of that shape: 512 colours + start token,
  no dropout, seeded."""
  import torch
  import transformers
  torch.manual_seed(0)
  return transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(
      n_layer=args.layers, n_embd=args.d_model, n_head=args.heads,
      n_positions=args.resolution ** 2, vocab_size=513, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0))
