"""``flow echo``: C-ECHO a DICOM peer (entry point ``flow.commands``: ``dimse``).

    flow echo HOST PORT --called-aet AET [--calling-aet AET] [--timeout S]
              [--tls] [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] [--tls-server-name N]

Exit status 0 when the peer answered the C-ECHO with Success; otherwise one line saying
what happened (refused, rejected with which codes, TLS failure, status) and exit 1. Any
``--tls-*`` option implies ``--tls``. An operator tool: no graph, no egress allowlist.
(``flow check --probe`` C-ECHOes every PACS of a graph through its sender node.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from flow import ConfigError

from .tls import client_context


def register(subparsers: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = subparsers.add_parser("echo", help="C-ECHO a DICOM peer (exit 0 on success)")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--called-aet", required=True, help="the peer's AE title")
    p.add_argument("--calling-aet", default="DICOMFLOW", help="our AE title (default DICOMFLOW)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="connect/association/response timeout (default 10)")
    p.add_argument("--tls", action="store_true", help="connect with TLS 1.2+")
    p.add_argument("--tls-ca", metavar="FILE", help="CA to verify the peer (default: system)")
    p.add_argument("--tls-cert", metavar="FILE", help="our client certificate (mTLS)")
    p.add_argument("--tls-key", metavar="FILE", help="our client key (mTLS)")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="name the peer's certificate must carry (default: HOST)")
    common(p)
    p.set_defaults(func=cmd_echo)


def cmd_echo(args: argparse.Namespace) -> int:
    from ._pynetdicom import Peer, echo  # pynetdicom: only for this command, not every `flow`

    if not 0 < args.port < 65536:
        raise ConfigError(f"port {args.port} is not 1..65535")
    tls = args.tls or any((args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name))
    context = client_context(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) \
        if tls else None
    peer = Peer(args.host, args.port, args.called_aet, args.calling_aet,
                timeout_s=args.timeout, ssl_context=context,
                server_hostname=args.tls_server_name or args.host)
    result = echo(peer)
    where = f"{args.host}:{args.port} ({args.called_aet})"
    if result.ok:
        print(f"C-ECHO {where}: success 0x0000 in {result.ms:.0f} ms"
              + (" over TLS" if tls else ""))
        return 0
    print(f"flow echo: C-ECHO {where} failed: {result.reason}", file=sys.stderr)
    return 1
