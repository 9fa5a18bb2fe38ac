"""`ainode` command line: serve, check-config, status, requeue, complete, monitor, feedback, audit verify,
report usage, replay, synth."""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from node.config import ConfigError, load_config
from node.stop_request import StopRequest


def _load(path: str | None):  # type: ignore[no-untyped-def]
    try:
        return load_config(Path(path) if path else None)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        sys.exit(2)


def _tls_ok(loaded) -> bool:  # type: ignore[no-untyped-def]
    """TLS files are checked by check-config and serve only: other commands need not read the private key."""
    from node.config.tls import config_dir, tls_errors

    base = config_dir(loaded.source)
    errors = tls_errors(loaded.config, base)
    atna = loaded.config.atna
    if atna is not None and atna.enabled and atna.transport == "tls":
        from node.audit.forward import AtnaConfigError, tls_context

        try:
            tls_context(atna.resolved(base))
        except AtnaConfigError as exc:
            errors.append(str(exc))
    for line in errors:
        print(f"{loaded.source}: {line}", file=sys.stderr)
    return not errors


def cmd_check_config(args: argparse.Namespace) -> int:
    from node.models import ModelError
    from node.models.lock import verify_models
    from node.plugin_api import PluginNotFound
    from node.run.slots import SlotConfigError, describe_slots

    loaded = _load(args.config)
    cfg = loaded.config
    if not _tls_ok(loaded):
        return 2
    try:
        models = verify_models(cfg, loaded.storage.models_dir)
    except ModelError as exc:
        print(exc, file=sys.stderr)
        return 2
    for m in models:
        print(f"model {m.name} {m.version}: sha256 verified ({m.weights_sha256[:12]}…)"
              + (", not for clinical use" if m.manifest.not_for_clinical_use else ""))
    try:
        print(describe_slots(cfg))
    except (SlotConfigError, PluginNotFound) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{loaded.source}: OK — AE {cfg.node.ae_title} port {cfg.node.port}, "
          f"{len(cfg.rules)} rule(s), {len(cfg.destinations)} DICOM destination(s)"
          + "".join(f", {len(m)} {k}" for k, m in (("DICOMweb", cfg.dicomweb), ("RIS", cfg.ris), ("FHIR", cfg.fhir))
                    if m)
          + f", plugins: {', '.join(cfg.plugins)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from node.logs import setup_logging
    from node.models import ModelError
    from node.plugin_api import PluginNotFound
    from node.audit.forward import AtnaConfigError
    from node.run.slots import SlotConfigError
    from node.api.server import ApiConfigError, ApiStartError
    from node.service import NodeService
    from node.store.engine import StoreError

    setup_logging(args.log_level)
    loaded = _load(args.config)
    if not _tls_ok(loaded):
        return 2
    try:
        node = NodeService(loaded)
    except (SlotConfigError, PluginNotFound, AtnaConfigError, ApiConfigError, ApiStartError, StoreError) as exc:
        print(f"refusing to start: {exc} ({loaded.source})", file=sys.stderr)
        return 2
    stop = StopRequest()
    stop.install()
    # `kill -USR1 <pid>` writes every thread's stack to the log: for a node that hangs, and works even then
    # (faulthandler writes from the signal handler, without the GIL). Stacks hold code locations only.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        node.start()
    except ModelError as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot listen on {loaded.config.node.host}:{loaded.config.node.port} "
              f"(node.port in {loaded.source}): {exc.strerror}", file=sys.stderr)
        return 1
    print(f"ainode: {loaded.config.node.ae_title} listening on {loaded.config.node.host}:{node.scp.port} "
          f"(config: {loaded.source}, storage: {loaded.storage.spool_dir.parent})", flush=True)
    stop.wait()
    node.stop()
    return 0


def _fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_status(args: argparse.Namespace) -> int:
    from node.store import Store

    loaded = _load(args.config)
    store = Store(loaded.storage.database_url)
    rows = store.status_rows(args.limit)
    if not rows:
        print("no studies received yet")
        return 0
    for r in rows:
        st = r["study"]
        took = f"{st.completed_at - st.last_received_at:+.1f}s after last image" if st.completed_at else ""
        print(f"study {st.study_uid}  state={st.state}  instances={st.instance_count}  "
              f"from={st.calling_ae}  received={_fmt_time(st.first_received_at)}  "
              f"complete={_fmt_time(st.completed_at)} ({st.completion_reason or '-'}) {took}")
        for jr in r["jobs"]:
            j = jr["job"]
            t = j.timings or {}
            timing = " ".join(f"{k}={v}" for k, v in t.items())
            dests = ",".join(jr["destinations"]) or "none"
            counts = " ".join(f"{k}={v}" for k, v in sorted(jr["dispatch_counts"].items())) or "-"
            print(f"  job {j.id}  rule={j.rule}  plugin={j.plugin} {j.plugin_version or ''}  state={j.state}  "
                  f"attempts={j.attempts}  destinations={dests}  sends: {counts}")
            if timing:
                print(f"    timings: {timing}")
            if j.summary:
                print(f"    result: {j.summary}")
            if j.error:
                print(f"    error: {j.error}")
    return 0


def _ask_node(store, action: str, wait_s: float, **target):  # type: ignore[no-untyped-def]
    """Leave a request in the store for the node (the audit log's only writer) and wait up to `wait_s` for
    its outcome. Returns (request id, outcome dict or None if the node did not answer in time)."""
    import getpass
    import socket

    request_id = store.add_request(action, requested_by=f"{getpass.getuser()}@{socket.gethostname()}", **target)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        req = store.get_request(request_id)
        if req.handled_at is not None:
            return request_id, req.outcome or {}
        time.sleep(0.2)
    print(f"{action} request {request_id} recorded; the node carries it out when it runs "
          f"(it did not answer within {wait_s:g} s)")
    return request_id, None


def cmd_requeue(args: argparse.Namespace) -> int:
    from node.store import JobState, Store

    loaded = _load(args.config)
    store = Store(loaded.storage.database_url)
    if args.job is not None:
        job = store.get_job(args.job)
        if job is None:
            print(f"no job {args.job} in {loaded.storage.database_url} (see `ainode status`)", file=sys.stderr)
            return 1
        if job.state not in (JobState.DEAD_LETTER, JobState.FAILED):
            print(f"job {args.job} is {job.state}; only failed and dead-letter jobs can be requeued",
                  file=sys.stderr)
            return 1
    _, out = _ask_node(store, "requeue", args.wait, job_id=args.job, study_uid=args.study)
    if out is None:
        return 0
    for r in out["resent"]:
        print(f"job {r['job_id']}: {r['objects']} dead-letter object(s) queued for sending again")
    for r in out["rerun"]:
        print(f"job {r['job_id']}: queued to run again")
    for r in out["skipped"]:
        print(f"job {r['job_id']}: not requeued, it is {r['state']}")
    if not (out["resent"] or out["rerun"] or out["skipped"]):
        print("nothing to requeue: no failed or dead-letter jobs matched")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    """Declare a study complete now (an operator who knows the send has ended); the node carries it out."""
    from node.store import Store

    loaded = _load(args.config)
    store = Store(loaded.storage.database_url)
    if store.get_study(args.study) is None:
        print(f"no study {args.study} in {loaded.storage.database_url} (see `ainode status`)", file=sys.stderr)
        return 1
    _, out = _ask_node(store, "complete", args.wait, study_uid=args.study)
    if out is None:
        return 0
    if out.get("completed"):
        print(f"study {args.study}: complete (forced), {out.get('instances')} instance(s); routing follows")
        return 0
    print(f"study {args.study}: not completed: {out.get('why')}", file=sys.stderr)
    return 1


def cmd_monitor(args: argparse.Namespace) -> int:
    from node.monitor.cli import print_monitor
    from node.store import Store

    loaded = _load(args.config)
    return print_monitor(Store(loaded.storage.database_url), loaded.config.monitoring, args.json, args.job)


def cmd_feedback(args: argparse.Namespace) -> int:
    from node.monitor.cli import feedback
    from node.store import Store

    loaded = _load(args.config)
    return feedback(Store(loaded.storage.database_url), args.job, args.finding, args.verdict, args.value, args.by)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from node.audit import verify_log

    path = Path(args.log) if args.log else _load(args.config).storage.audit_log
    result = verify_log(path)
    if result.ok:
        print(f"{path}: OK, {result.records} records, chain intact")
        return 0
    where = f"line {result.bad_line}: " if result.bad_line else ""
    print(f"{path}: {where}{result.reason}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ainode", description="PACS-integrated DICOM AI node")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the node until SIGTERM")
    s.add_argument("--config", help="config file (default: embedded defaults)")
    s.add_argument("--log-level", default="INFO")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("check-config", help="validate a config file; print every error with its key path")
    s.add_argument("config")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("status", help="list studies with state, rule, plugin, timings and dispatch result")
    s.add_argument("--config")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("requeue", help="send dead-letter results again, or run failed jobs again")
    s.add_argument("--config")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", type=int, help="one job (its id from `ainode status`)")
    which.add_argument("--study", help="every failed or dead-letter job of this Study Instance UID")
    which.add_argument("--all", action="store_true", help="every failed or dead-letter job")
    s.add_argument("--wait", type=float, default=15, help="seconds to wait for the node to confirm")
    s.set_defaults(func=cmd_requeue)

    s = sub.add_parser("complete", help="declare a study complete now, without waiting for its quiet period")
    s.add_argument("--config")
    s.add_argument("--study", required=True, help="Study Instance UID")
    s.add_argument("--wait", type=float, default=15, help="seconds to wait for the node to confirm")
    s.set_defaults(func=cmd_complete)

    s = sub.add_parser("monitor", help="model drift per model version and scanner, shadow agreement, feedback")
    s.add_argument("--config")
    s.add_argument("--json", action="store_true")
    s.add_argument("--job", type=int, help="list one job's findings (their numbers are what `feedback` takes)")
    s.set_defaults(func=cmd_monitor)

    s = sub.add_parser("feedback", help="record a radiologist's accept/reject/correct of one finding")
    s.add_argument("--config")
    s.add_argument("--job", type=int, required=True)
    s.add_argument("--finding", type=int, required=True, help="finding number (1-based; `monitor --job N`)")
    s.add_argument("--verdict", required=True, choices=["accept", "reject", "correct"])
    s.add_argument("--value", type=float, help="the corrected value (with --verdict correct)")
    s.add_argument("--by", help="reviewer")
    s.set_defaults(func=cmd_feedback)

    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="check the hash chain; name the first bad line")
    v.add_argument("--config")
    v.add_argument("--log", help="audit log path (default: from the config)")
    v.set_defaults(func=cmd_audit_verify)

    from node.report.cli import add_parsers as add_report_parsers

    add_report_parsers(sub)
    sub.add_parser("synth", help="write a synthetic chest CT series (ainode synth --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synth"]:  # its own parser, so `ainode synth --help` shows the generator's options
        from node.synth import main as synth_main

        return synth_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
