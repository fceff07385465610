"""``recsvc publish | rollback | versions | serve``: the serving side of the command line.

Exit codes: 0 success; 1 the artifact is missing/corrupt, the publish failed verification, or there
is nothing to roll back to; 2 bad usage (click); 3 Redis is unreachable.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import shlex
import sys
from pathlib import Path
from typing import Any, cast

import click
import redis

from recsvc.core import logs
from recsvc.core.artifact import ArtifactError, read_artifact, resolve
from recsvc.core.config import Config
from recsvc.core.cpus import available_cpus, default_workers
from recsvc.core.progress import Progress
from recsvc.serving.model import ServingModel
from recsvc.storage import keys, versions
from recsvc.storage.connection import connect_admin
from recsvc.storage.embedded import ensure_redis
from recsvc.web.app import create_app
from recsvc.web.auth import configured_keys_problem
from recsvc.web.metrics import fold_dead_worker, prepare_dir
from recsvc.web.server import WORKER_CLASSES

EXIT_FAILED = 1
EXIT_REDIS = 3

DEFAULT_THREADS = 1
# buffered: gthread whose threads only see whole requests -- a slow or idle client costs a buffer, not
# a thread -- at gthread's cost per request (docs/operations.md, slow clients, for the designs measured).
DEFAULT_WORKER_CLASS = "buffered"
# A unix socket path longer than this does not fit sockaddr_un (108 bytes with the NUL).
_MAX_SOCKET_PATH = 100


def auto_workers(config: Config) -> int:
    """Workers when ``--workers`` is not given: ``RECSVC_WORKERS``, else 2 per CPU of the quota.

    A request is ~0.1 ms of Redis wait and ~0.3 ms of Python: processes, not threads, add
    throughput (threads contend for the GIL and raised p99 in bench/serve.py), so 2 single-threaded
    workers per CPU that the container's quota and the affinity mask allow, capped at
    ``RECSVC_MAX_WORKERS`` (each worker holds its own copy of the live model's item side).
    """
    if config.ops.workers > 0:
        return config.ops.workers
    return default_workers(available_cpus(), config.ops.max_workers)


def instance_dir(config: Config, host: str, port: int) -> Path:
    """This server instance's folder: its metrics files and gunicorn control socket."""
    safe_host = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return (Path(config.var_dir) / "run" / f"{safe_host}-{port}").resolve()


class _Failed(click.ClickException):
    exit_code = EXIT_FAILED


class _RedisDown(click.ClickException):
    exit_code = EXIT_REDIS


def _config(models_dir: str | None = None) -> Config:
    try:
        config = Config.from_env()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return config.with_overrides(models_dir=Path(models_dir)) if models_dir else config


def _admin_client(config: Config) -> redis.Redis:

    try:
        url = ensure_redis(config)
        client = connect_admin(url)
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError, RuntimeError) as e:
        where = config.redis.url or f"embedded redis under {config.var_dir}/redis"
        raise _RedisDown(f"Redis is unreachable ({where}): {e}") from None
    return client


@click.command()
@click.argument("ref", required=False, default="latest")
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where versions live (default: RECSVC_MODELS_DIR or ./models).",
)
@click.option("--force", is_flag=True, help="Publish even a version the retrain quality gate refused.")
def publish(ref: str, models_dir: str | None, force: bool) -> None:
    """Load model REF into Redis, verify it, then switch serving to it.

    REF is a version folder, a version name under the models folder, or `latest` (the default).
    The previous live version stays published for `recsvc rollback`; versions beyond
    RECSVC_KEEP_VERSIONS (3) are deleted from Redis. A version the retrain quality gate refused is
    not published unless --force is given.
    """
    config = _config(models_dir)
    try:
        artifact = read_artifact(resolve(config.models_dir, ref))
    except ArtifactError as e:
        raise _Failed(str(e)) from None
    gate = artifact.manifest.get("gate")
    if gate and not (gate.get("passed") or gate.get("forced")):
        if not force:
            raise _Failed(
                f"{artifact.version} was refused by the retrain gate: "
                f"{gate.get('reason', 'no reason recorded')} (use --force to publish it anyway)"
            )
        click.echo(
            f"warning: publishing {artifact.version} although the retrain gate refused it (--force)", err=True
        )
    client = _admin_client(config)
    stats: list[versions.PublishStats] = []
    with Progress(f"publish {artifact.version}", total=artifact.n_users, unit="users") as bar:
        try:
            previous = versions.current_version(client)
            version = versions.publish(client, artifact, config, progress=bar.update, stats=stats)
        except (ArtifactError, versions.PublishError) as e:
            raise _Failed(str(e)) from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise _RedisDown(f"Redis failed during publish: {e}; the live version is unchanged") from None
    s = stats[0]
    note = " (already in Redis; made live again)" if s.reused else ""
    click.echo(
        f"published {version}{note}: {s.users} users, {s.items} items, {s.buckets} buckets "
        f"in {s.seconds:.2f}s ({s.users_per_second:,.0f} users/s); previous live: {previous or 'none'}"
    )


@click.command()
def rollback() -> None:
    """Switch serving back to the version that was live before the current one."""

    client = _admin_client(_config())
    before = versions.current_version(client)
    try:
        version = versions.rollback(client, _config())
    except versions.RollbackError as e:
        raise _Failed(str(e)) from None
    click.echo(f"rolled back: {before} -> {version}")


@click.command("versions")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_versions(as_json: bool) -> None:
    """List the versions published in Redis, newest first, marking the live one with `*`."""
    import json

    rows = versions.list_published(_admin_client(_config()))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no published versions (run `recsvc publish latest`)")
        return
    click.echo(f"  {'version':<40} {'published (UTC)':<20} {'users':>9} {'items':>9}")
    for row in rows:
        when = _dt.datetime.fromtimestamp(row["published_at"], _dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        mark = "*" if row["live"] else " "
        click.echo(f"{mark} {row['version']:<40} {when:<20} {row['users']:>9} {row['items']:>9}")


def example_requests(client: redis.Redis, base_url: str) -> list[str]:
    """Three ``curl`` lines that work against the live model: a known user, an item, a category.

    Returns an empty list when nothing is published.
    """

    version = versions.current_version(client)
    if version is None:
        return []
    model = ServingModel.load(client, version)
    user = None
    for bucket in range(model.n_buckets):
        # One field name (or None for an empty hash): the client returns raw bytes.
        found = cast("bytes | None", client.hrandfield(keys.bucket(version, "topk", bucket)))
        if found:
            user = found.decode()
            break
    item = model.item_ids[int(model.popular[0])]
    lines = []
    if user:
        lines.append(f"curl -s '{base_url}/v1/users/{user}/recommendations?n=5'")
    lines.append(f"curl -s '{base_url}/v1/items/{item}/similar?n=5'")
    cat = model.category[int(model.popular[0])]
    if cat >= 0:
        from urllib.parse import quote

        lines.append(f"curl -s '{base_url}/v1/popular?n=5&category={quote(model.categories[cat])}'")
    else:
        lines.append(f"curl -s '{base_url}/v1/popular?n=5'")
    return lines


class _GunicornApp:
    """Run gunicorn in-process with recsvc's app factory (called once per worker, after fork)."""

    def __init__(self, options: dict[str, Any]):
        from gunicorn.app.base import BaseApplication

        outer = self

        class App(BaseApplication):
            def load_config(self) -> None:
                for key, value in outer.options.items():
                    self.cfg.set(key, value)

            def load(self):
                # The command line has already warned about unknown variables once.
                return create_app(warn_unknown=False)

        self.options = options
        self.app = App()

    def run(self) -> None:
        self.app.run()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port.")
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(1, 1024),
    help="gunicorn worker processes [default: RECSVC_WORKERS, else 2 per CPU of the container's "
    "quota, at most RECSVC_MAX_WORKERS (16)].",
)
@click.option(
    "--worker-class",
    default=DEFAULT_WORKER_CLASS,
    show_default=True,
    type=click.Choice(sorted(WORKER_CLASSES)),
    help="buffered: gthread whose threads only see whole requests (slow clients cannot starve it); "
    "gevent: one greenlet per connection; gthread: plain, a slow client holds a thread.",
)
@click.option(
    "--threads",
    default=DEFAULT_THREADS,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Threads per worker (gthread only).",
)
@click.option(
    "--timeout", default=120, show_default=True, type=click.IntRange(5, 3600), help="Worker timeout, s."
)
@click.option("--access-log", is_flag=True, help="Log every request to stderr (gunicorn access log).")
@click.option(
    "--dev", is_flag=True, help="Flask's development server instead of gunicorn (never in production)."
)
@click.option(
    "--examples", is_flag=True, help="Print three curl lines that work against the live model first."
)
def serve(
    host: str,
    port: int,
    workers: int | None,
    worker_class: str,
    threads: int,
    timeout: int,
    access_log: bool,
    dev: bool,
    examples: bool,
) -> None:
    """Serve the HTTP API: gunicorn in production (request-buffering threaded workers), --dev for Flask's.

    Without REDIS_URL the embedded Redis under var/redis is started once here and its URL handed to
    every worker through the environment. Each instance keeps its metrics files and its gunicorn
    control socket under RECSVC_VAR_DIR/run/<host>-<port>/.
    """

    # Scoring one user is a small matrix-vector product: BLAS threads only contend with the other
    # workers (bench/realtime.py measured ~2x the latency with the default). Set before numpy loads.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    config = _config()
    problem = configured_keys_problem(config)
    if problem:
        raise click.UsageError(problem)
    workers = workers or auto_workers(config)
    try:
        url = ensure_redis(config)
    except (RuntimeError, OSError) as e:
        raise _RedisDown(f"cannot start the embedded Redis: {e}") from None
    os.environ["REDIS_URL"] = url  # every worker (and its create_app) uses this one server
    base = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"
    client = _admin_client(config.with_overrides(redis_url=url))
    if examples:
        lines = example_requests(client, base)
        if lines:
            click.echo("Try:")
            for line in lines:
                click.echo(f"  {line}")
        else:
            click.echo(
                "nothing is published yet: run `recsvc publish latest` (answers are fallbacks until then)"
            )
    client.close()
    how = "flask dev server" if dev else f"gunicorn, {workers} {worker_class} workers"
    click.echo(f"recsvc serving on {base} ({how})")
    sys.stdout.flush()
    if dev:
        create_app().run(host=host, port=port, threaded=True, use_reloader=False)
        return
    run_dir = instance_dir(config, host, port)
    _claim(run_dir, base)
    options: dict[str, Any] = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": WORKER_CLASSES[worker_class],
        "threads": threads,
        "timeout": timeout,
        "graceful_timeout": 30,
        "keepalive": 5,
        "accesslog": "-" if access_log else None,
        "logger_class": "recsvc.web.server.RedactingLogger",  # no key reaches the access log
        # The longest valid URL (200 excluded ids of 128 characters) is ~26 KB, past gunicorn's 8 KB
        # line limit: 0 lets gunicorn read up to its own 1 MB bound; the app answers 414 beyond 64 KiB.
        "limit_request_line": 0,
        "errorlog": "-",
        "loglevel": config.ops.log_level.lower(),
        "proc_name": f"recsvc-{port}",
        **_control_socket(run_dir),
    }
    shown = " ".join(shlex.quote(f"--{k}={v}") for k, v in options.items() if v is not None)
    click.echo(f"gunicorn {shown}", err=True)
    options["logconfig_dict"] = logs.dict_config(
        config.ops.log_level, config.ops.log_format, config.ops.log_flush_s
    )
    if config.ops.metrics_enabled:
        options.update(_metrics_hooks(run_dir / "metrics"))
    _GunicornApp(options).run()


_claimed: list[int] = []  # the instance lock's descriptor, held until the process exits


def _claim(run_dir: Path, base: str) -> None:
    """Hold this instance's folder for the life of the process: a second `recsvc serve` on the same
    address must not empty the first one's metrics folder before failing to bind."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "instance.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _Failed(
            f"another recsvc serve already serves {base} (it holds {run_dir}/instance.lock)"
        ) from None
    _claimed.append(fd)


def _control_socket(run_dir: Path) -> dict[str, Any]:
    """gunicorn's control socket in this instance's folder (never the per-user default path that
    every instance on the host would share)."""
    path = run_dir / "gunicorn.ctl"
    if len(str(path)) > _MAX_SOCKET_PATH:
        click.echo(f"warning: {path} is too long for a unix socket; no control socket", err=True)
        return {"control_socket_disable": True}
    run_dir.mkdir(parents=True, exist_ok=True)
    return {"control_socket": str(path), "control_socket_mode": 0o600}


def _metrics_hooks(metrics_dir: Path) -> dict[str, Any]:
    """An empty multiprocess folder for this instance, handed to every worker, and the master's
    hook that folds an exited worker's counts into the archive files."""
    prepare_dir(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # workers read it (Config and the client)

    def worker_exit(server: Any, worker: Any) -> None:
        # In the exiting worker: write the counts it still holds before its file is folded.
        services = getattr(worker.wsgi, "extensions", {}).get("recsvc")
        if services is not None and services.metrics is not None:
            services.metrics.flush()

    def child_exit(server: Any, worker: Any) -> None:
        fold_dead_worker(metrics_dir, worker.pid)

    return {"worker_exit": worker_exit, "child_exit": child_exit}
