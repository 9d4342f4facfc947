"""`mstar-hf push FOLDER --repo-id ID`: publish a saved mSTAR folder to the Hub in one commit."""

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="publish a saved mSTAR model folder to the Hugging Face Hub (one commit, model card included)",
        description=(
            "Upload a save_pretrained folder (safetensors weights, configs, processor and custom code) to the Hub "
            "in a single commit. A model card is rendered from the folder's config.json, training_args.json and "
            "eval_results.json unless the folder already has a README.md. Token from HF_TOKEN or `hf auth login`; "
            "endpoint from HF_ENDPOINT."
        ),
    )
    parser.add_argument("folder", help="folder written by save_pretrained")
    parser.add_argument("--repo-id", required=True, help="target repository, 'namespace/name' (or 'name')")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit-message", default=None, help="commit title")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--license", default="apache-2.0", help="license id for a rendered card (default apache-2.0)")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model, for a rendered card")
    parser.add_argument("--dataset", dest="datasets", action="append", default=None,
                        help="Hub dataset id used for training, for a rendered card (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import PushError, PushInputError, push_folder

    card_kwargs = {"license": args.license}
    if args.base_model:
        card_kwargs["base_model"] = args.base_model
    if args.datasets:
        card_kwargs["datasets"] = args.datasets
    try:
        info = push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            card_kwargs=card_kwargs,
        )
    except PushInputError as exc:
        print(f"mstar-hf push: {exc}", file=sys.stderr)
        return 2
    except PushError as exc:
        print(f"mstar-hf push: {exc}", file=sys.stderr)
        return 1
    print(f"Pushed {args.folder} to {info.repo_url.repo_id} in commit {info.oid}")
    print(info.commit_url)
    return 0
