"""`kubetune operator`: run the FineTuneJob operator (in its Deployment, or against a kubeconfig)."""

from __future__ import annotations

import argparse

LOG_LEVELS = ("debug", "info", "warning", "error")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "operator",
        help="run the FineTuneJob operator",
        description=(
            "Watch FineTuneJobs and turn each into a ConfigMap, a headless Service and an Indexed Job "
            "of trainer pods; keep their status true. Serves /metrics, /healthz and /readyz."
        ),
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", dest="namespaces", metavar="NS",
        help="watch this namespace (repeatable); default: the operator's own namespace (POD_NAMESPACE)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true",
        help="watch every namespace (needs cluster-wide RBAC: the chart's rbac.clusterWide)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log verbosity (default info)")
    parser.add_argument("--kubeconfig", help="kubeconfig file; default: in-cluster credentials, then ~/.kube/config")
    parser.add_argument("--http-port", type=int, default=8080, help="port of /metrics, /healthz, /readyz")
    parser.add_argument("--trainer-image", help="default trainer image (env KUBETUNE_TRAINER_IMAGE)")
    parser.add_argument("--resync-seconds", type=float, help="how often each job is re-checked (default 10)")
    parser.add_argument(
        "--no-leader-election", action="store_true",
        help="act without holding the Lease (only when exactly one replica runs)",
    )
    parser.set_defaults(handler=run)


def watched_namespaces(args: argparse.Namespace, own_namespace: str) -> list[str] | None:
    """The namespaces to watch (None: every one). Without -n or -A, only the operator's own:
    the chart grants write rights per namespace, so a cluster-wide watch must be asked for."""
    if args.all_namespaces:
        return None
    return args.namespaces or [own_namespace]


def run(args: argparse.Namespace) -> int:
    import kopf

    from kubetune.operator.runtime.main import lease_namespace
    from kubetune.operator.runtime.main import run as run_operator
    from kubetune.operator.settings import OperatorSettings

    kopf.configure(debug=args.log_level == "debug", quiet=args.log_level in ("warning", "error"))
    settings = OperatorSettings.from_env(default_image=args.trainer_image, resync_seconds=args.resync_seconds)
    return run_operator(
        watched_namespaces(args, lease_namespace()),
        settings=settings,
        kubeconfig=args.kubeconfig,
        http_port=args.http_port,
        leader_election=not args.no_leader_election,
    )
