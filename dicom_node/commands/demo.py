"""``dicom-node demo``: send a phantom study to the running node like a modality, show what came back."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from dicom_node.commands._common import add_config_argument, config_from
from dicom_node.errors import UserError

NAME = "demo"
HELP = "send a synthetic CT study with known findings to the running node and show the results"


def add_arguments(parser) -> None:
    add_config_argument(parser)
    parser.add_argument("--pacs", metavar="AE@HOST:PORT",
                        help="your PACS, configured as a results destination of the node; without it a "
                             "throw-away dcmtk storescp plays the PACS of the config's results destination")
    parser.add_argument("--seed", type=int, default=20261123, help="phantom seed (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the results")
    parser.add_argument("--keep", metavar="DIR", help="keep the phantom and received results in DIR")


def _parse_pacs(text: str) -> tuple[str, str, int]:
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return ae, host, int(port)
    except ValueError:
        raise UserError(f"--pacs {text!r}: expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242") from None


def _results_destination(config, pacs: tuple[str, str, int] | None) -> str:
    analyze_rules = [r for r in config.rules if r.analyze]
    if not analyze_rules or not analyze_rules[0].results_to:
        raise UserError("no routing rule analyzes CT series and sends its results anywhere: add "
                        "`analyze: default` and `results_to: [pacs]` to a rule in the config")
    names = analyze_rules[0].results_to
    if pacs is None:
        return names[0]
    for name in names:
        d = config.destinations[name]
        if (d.ae_title, d.port) == (pacs[0], pacs[2]):
            return name
    raise UserError(f"--pacs {pacs[0]}@{pacs[1]}:{pacs[2]} is not a results destination of rule "
                    f"{analyze_rules[0].name!r} ({', '.join(names)}): add it to destinations and results_to")


def run(args) -> int:
    from sqlalchemy import select

    from ai_core.phantom.generator import generate_case, write_case
    from dicom_node.errors import DeliveryError
    from dicom_node.send import Outgoing, echo, send_files
    from dicom_node.config import Destination
    from storage.db import make_engine, session_factory
    from storage.models import Delivery, Job, Result, Series

    config = config_from(args)
    listener = config.listeners[0]
    host = "127.0.0.1" if listener.host in ("0.0.0.0", "::") else listener.host
    node = Destination(ae_title=listener.ae_title, host=host, port=listener.port)
    try:
        echo(node, calling_ae="DEMO_CT")
    except DeliveryError:
        raise UserError(f"the node does not answer at {node.ae_title}@{host}:{node.port}: start it first "
                        "(`make run`, or `dicom-node serve` with the same --config) and allow AE DEMO_CT "
                        "from this host in network.allowed_peers") from None
    pacs = _parse_pacs(args.pacs) if args.pacs else None
    dest_name = _results_destination(config, pacs)
    dest = config.destinations[dest_name]

    work = Path(args.keep or tempfile.mkdtemp(prefix="ctvlp-demo-"))
    storescp = None
    if pacs is None:
        storescp = _start_storescp(dest, work / "pacs")
    try:
        print(f"generating phantom (seed {args.seed}) ...", flush=True)
        # 180 slices of 3 mm: every organ whole in the field of view, so every finding is evaluated
        case = generate_case(args.seed, balanced_index=0, size=(256, 256, 180))
        truth_path = write_case(case, work / "phantom")
        truth = json.loads(truth_path.read_text())
        files = sorted((truth_path.parent / "series").glob("*.dcm"))
        from pydicom import dcmread

        items = []
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            items.append(Outgoing(ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, f))
        print(f"sending {len(items)} CT images to {node.ae_title}@{host}:{node.port} as AE DEMO_CT ...", flush=True)
        out = send_files(node, items, calling_ae="DEMO_CT")
        bad = [u for u, o in out.items() if not o.ok]
        if bad:
            raise UserError(f"the node refused {len(bad)} images: {out[bad[0]].error}")
        t_last = time.monotonic()
        print(f"sent; waiting for completion ({listener.stable_after:g} s of quiet), analysis and delivery "
              f"to {dest_name} ({dest.ae_title}@{dest.host}:{dest.port}) ...", flush=True)
        factory = session_factory(make_engine(config.database_url))
        series_uid = case.series_uid
        deadline = time.monotonic() + args.timeout
        state = ""
        while time.monotonic() < deadline:
            with factory() as s:
                jobs = s.scalars(select(Job).where(Job.series_instance_uid == series_uid)).all()
                analyze = [j for j in jobs if j.kind == "analyze"]
                results = s.scalars(select(Result).where(Result.source_series_uid == series_uid,
                                                         Result.superseded_by.is_(None))).all()
                uids = [r.sop_instance_uid for r in results]
                delivered = s.scalars(select(Delivery).where(Delivery.sop_instance_uid.in_(uids),
                                                             Delivery.destination == dest_name)).all() if uids else []
                series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
            now_state = (f"series {series.state if series else 'not indexed yet'}; analysis "
                         f"{analyze[-1].state if analyze else 'not queued yet'}; results delivered "
                         f"{sum(d.state == 'done' for d in delivered)}/{sum(r.kind in dest.results for r in results)}")
            if now_state != state:
                print("  " + now_state, flush=True)
                state = now_state
            if analyze and analyze[-1].state == "failed":
                raise UserError(f"the analysis failed: {analyze[-1].last_error}. See `dicom-node jobs --failed`.")
            wanted = [r for r in results if r.kind in dest.results]
            if wanted and all(any(d.sop_instance_uid == r.sop_instance_uid and d.state == "done" for d in delivered)
                              for r in wanted):
                break
            if any(d.state == "failed" for d in delivered):
                raise UserError(f"delivery to {dest_name} failed: see `dicom-node jobs --failed`")
            time.sleep(0.5)
        else:
            raise UserError(f"no results after {args.timeout:g} s; see `dicom-node status` and `dicom-node jobs`")
        elapsed = time.monotonic() - t_last
        _print_findings(config, factory, series_uid, truth)
        print(f"\ntime from last image to results delivered: {elapsed:.1f} s "
              f"(of which {listener.stable_after:g} s waiting for the series to be complete)")
        if storescp is not None:
            print(f"the throw-away PACS received {len(list((work / 'pacs').glob('*')))} objects in {work / 'pacs'}")
    finally:
        if storescp is not None:
            storescp.terminate()
            storescp.wait(10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _start_storescp(dest, outdir: Path):
    import os
    import subprocess

    from dicom_node.send import echo

    if dest.host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"the results destination {dest.ae_title}@{dest.host}:{dest.port} is not on this host; "
                        f"pass --pacs {dest.ae_title}@{dest.host}:{dest.port} to use it")
    binary = shutil.which("storescp")
    if binary is None:
        raise UserError("storescp is not installed: `apt-get install dcmtk`, or pass --pacs AE@HOST:PORT")
    outdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--aetitle", dest.ae_title, "--output-directory", str(outdir),
                             "--accept-all", str(dest.port)], env={**os.environ, "TCP_NODELAY": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(50):
        if proc.poll() is not None:
            raise UserError(f"storescp could not listen on port {dest.port}: "
                            f"{proc.stderr.read().decode(errors='replace').strip()}")
        try:
            echo(dest, calling_ae="DEMO")
            print(f"started a throw-away storescp as {dest.ae_title} on port {dest.port}")
            return proc
        except Exception:
            time.sleep(0.1)
    proc.terminate()
    raise UserError(f"storescp did not answer on port {dest.port}")


def _print_findings(config, factory, series_uid: str, truth: dict) -> None:
    from sqlalchemy import select

    from ai_core.encode.readback import read_sr_findings
    from storage.models import Instance, Result

    with factory() as s:
        sr = s.scalar(select(Result).where(Result.source_series_uid == series_uid, Result.kind == "sr",
                                           Result.superseded_by.is_(None)))
        path = s.scalar(select(Instance.path).where(Instance.sop_instance_uid == sr.sop_instance_uid))
    findings = read_sr_findings(config.data_dir / "files" / path)
    print(f"\n{'organ':18} {'finding':18} {'truth':8} {'AI':14} {'p':>5}")
    agree = total = 0
    for f in sorted(findings, key=lambda f: (f.organ, f.finding)):
        t = truth["findings"].get(f.organ, {}).get(f.finding, {}).get("present")
        shown_truth = "-" if t is None else ("present" if t else "absent")
        mark = ""
        if t is not None and f.decision != "not evaluated":
            total += 1
            ok = (f.decision == "present") == bool(t)
            agree += ok
            mark = "" if ok else "  <- differs"
        p = "" if f.probability is None else f"{f.probability:.2f}"
        print(f"{f.organ:18} {f.finding:18} {shown_truth:8} {f.decision:14} {p:>5}{mark}")
    if total:
        print(f"\nAI agrees with the phantom's ground truth on {agree} of {total} evaluated findings "
              "(demo models: NOT FOR CLINICAL USE)")
