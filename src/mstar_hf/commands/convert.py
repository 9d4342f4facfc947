"""`mstar-hf convert`: released checkpoints -> `save_pretrained` folders (safetensors)."""

import json
import sys


def register(subparsers):
    parser = subparsers.add_parser(
        "convert",
        help="convert a timm patch-encoder or TransMIL aggregator state dict to a save_pretrained folder",
        description="Converts mSTAR.pth / UNI pytorch_model.bin / .safetensors (timm layout) or a TransMIL "
        "aggregator state dict into a transformers folder that AutoModel.from_pretrained loads.",
    )
    parser.add_argument("checkpoint", help=".pth, .bin or .safetensors state dict, or a timm Hub name "
                        "(hf-hub:org/name; needs network)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--kind", choices=["patch", "aggregator"], default="patch")
    parser.add_argument("--architecture", default="vit_large_patch16_224", help="timm architecture (patch)")
    parser.add_argument("--timm-kwargs", default=None, help='JSON dict of timm kwargs, e.g. \'{"depth": 2}\'')
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--head", choices=["drop", "keep"], default="drop",
                        help="aggregator: a downstream classification head (classifier.*, _fc2.*) is dropped, or "
                             "kept as an MStarForSlideClassification folder")
    parser.add_argument("--num-landmarks", type=int, default=None,
                        help="aggregator: Nystrom landmarks (not stored in the weights; default 256, the paper's)")
    parser.set_defaults(func=run)


def _report_conversion_log():
    """The conversion's log lines (a dropped or kept head) go to the console, once."""
    import logging

    class _Print(logging.Handler):
        def emit(self, record):
            print(f"mstar-hf convert: {record.getMessage()}", file=sys.stdout)

    log = logging.getLogger("mstar_hf.conversion")
    if not any(isinstance(h, _Print.__mro__[1]) and type(h).__name__ == "_Print" for h in log.handlers):
        log.addHandler(_Print())
    log.setLevel(logging.INFO)


def run(args) -> int:
    from ..conversion import ConversionError, convert_aggregator_checkpoint, convert_patch_checkpoint
    from ..modeling import MStarPatchConfig
    from ..modeling.configuration_mstar import DEFAULT_TIMM_KWARGS

    try:
        if args.kind == "patch":
            kwargs = json.loads(args.timm_kwargs) if args.timm_kwargs else dict(DEFAULT_TIMM_KWARGS)
            config = MStarPatchConfig(architecture=args.architecture, img_size=args.img_size, timm_kwargs=kwargs)
            model = convert_patch_checkpoint(args.checkpoint, args.out, config)
        else:
            _report_conversion_log()
            model = convert_aggregator_checkpoint(args.checkpoint, args.out, head=args.head,
                                                  num_landmarks=args.num_landmarks)
    except (ConversionError, ValueError) as err:
        print(f"mstar-hf convert: error: {err}")
        return 1
    params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} -> {args.out} ({type(model).__name__}, {params / 1e6:.1f}M parameters)")
    return 0
