"""The ``LLMMagics`` class: option parsing, notebook defaults and display; the work is in the library."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, kwds, magic_arguments
from IPython.display import Image, display
from traitlets import Bool, CaselessStrEnum, Float, Int, TraitError, Unicode, observe, validate

from tidyllm.magics import _call, _render

if TYPE_CHECKING:
    from tidyllm.platform import Platform

__all__ = ["LLMMagics", "CONFIG_KEYS"]

#: ``%llm_config`` key -> trait name (aliases accepted for the metadata names)
CONFIG_KEYS = {
    "user": "user", "user_id": "user", "department": "department", "reason": "reason", "audit_reason": "reason",
    "use_case": "use_case", "sensitivity": "sensitivity", "data_sensitivity": "sensitivity", "model": "model",
    "system": "system", "temperature": "temperature", "max_tokens": "max_tokens", "format": "format",
    "receipt": "receipt", "config": "settings_file", "database_url": "database_url", "gateway_uri": "gateway_uri",
    "gateway_mode": "gateway_mode", "gateway_config": "gateway_config",
}
_SHOWN = ["user", "department", "reason", "use_case", "sensitivity", "model", "system", "temperature", "max_tokens",
          "format", "receipt", "config", "database_url", "gateway_uri", "gateway_mode", "gateway_config"]
# traits that configure the platform itself: changing one re-installs it on the next call
_PLATFORM_TRAITS = ("settings_file", "database_url", "gateway_uri", "gateway_mode", "gateway_config")
# notebook default trait -> caller-metadata key (and the settings ``defaults`` key)
_CONTEXT = {"user": "user_id", "department": "department", "reason": "audit_reason", "use_case": "use_case",
            "sensitivity": "data_sensitivity"}


@magics_class
class LLMMagics(Magics):
    """``%%llm`` and friends: governed LLM calls and their budgets, routes and audit trail, in a notebook.

    Every trait is a notebook default: set it with ``%llm_config key=value`` or, for every notebook,
    ``c.LLMMagics.department = "risk"`` in ``ipython_config.py`` (``%config LLMMagics`` lists them).
    """

    user = Unicode(None, allow_none=True, config=True, help="user_id of every call")
    department = Unicode(None, allow_none=True, config=True, help="department of every call")
    reason = Unicode(None, allow_none=True, config=True, help="audit_reason of every call")
    use_case = Unicode(None, allow_none=True, config=True, help="use_case of every call (a routing feature)")
    sensitivity = Unicode(None, allow_none=True, config=True, help="data_sensitivity of every call")
    model = Unicode("chat", config=True, help="model group, gateway endpoint or LiteLLM model name (-m)")
    system = Unicode(None, allow_none=True, config=True, help="system prompt (-s)")
    temperature = Float(None, allow_none=True, config=True, help="sampling temperature, 0 to 2 (-t)")
    max_tokens = Int(None, allow_none=True, config=True, help="answer length cap (--max-tokens)")
    format = CaselessStrEnum(_render.FORMATS, default_value="markdown", config=True, help="answer format (-f)")
    receipt = Bool(True, config=True, help="print the receipt line under each answer")
    settings_file = Unicode(None, allow_none=True, config=True,
                            help="tidyllm.yaml to install the platform from (%llm_config config=...)")
    database_url = Unicode(None, allow_none=True, config=True, help="mart database URL (overrides settings)")
    gateway_uri = Unicode(None, allow_none=True, config=True, help="MLflow gateway URI (overrides settings)")
    gateway_mode = CaselessStrEnum(["legacy", "server"], default_value=None, allow_none=True, config=True,
                                   help="MLflow gateway flavour (overrides settings)")
    gateway_config = Unicode(None, allow_none=True, config=True, help="gateway routes file (overrides settings)")
    stream_display = CaselessStrEnum(["auto", "update", "print"], default_value="auto", config=True,
                                     help="--stream output: update a display in place (Jupyter), print tokens "
                                          "(terminal), or auto")
    settle_timeout = Float(10.0, config=True, help="seconds to wait for a call's settlement before the receipt")

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._reinstall = False
        self._adhoc: dict[tuple[int, str], Any] = {}
        self._watches: dict[int, tuple["Platform", _call.SettleWatch]] = {}
        #: call id of the last %%llm cell's answer (what %llm_feedback scores)
        self.last_call_id: str | None = None

    @validate("temperature")
    def _valid_temperature(self, proposal: Any) -> Any:
        value = proposal["value"]
        if value is not None and not 0.0 <= value <= 2.0:
            raise TraitError(f"temperature must be between 0 and 2, got {value}")
        return value

    @validate("max_tokens")
    def _valid_max_tokens(self, proposal: Any) -> Any:
        value = proposal["value"]
        if value is not None and value < 1:
            raise TraitError(f"max_tokens must be a positive integer, got {value}")
        return value

    @observe(*_PLATFORM_TRAITS)
    def _platform_changed(self, change: Any) -> None:
        self._reinstall = True

    @observe(*_CONTEXT)
    def _context_changed(self, change: Any) -> None:
        from tidyllm.platform import current

        if self.shell is None:
            return  # %llm_config's validation probe, not the notebook's magics
        installed = current()
        if installed is not None and not self._reinstall:
            self._identify(installed)

    def _identify(self, platform: "Platform") -> None:
        """Make the notebook's identity every LiteLLM call's (``%%ai``, any library built on LiteLLM, plain
        ``litellm`` calls): the session user and the ``%llm_config`` context."""
        from tidyllm.governance.identity import session_identity

        platform.identity.set_session(session_identity())
        platform.identity.declare({key: getattr(self, trait) for trait, key in _CONTEXT.items()})

    def forget_identity(self) -> None:
        """Take the notebook's identity off the installed platform (``%unload_ext tidyllm``)."""
        from tidyllm.platform import current

        installed = current()
        if installed is not None:
            installed.identity.set_session(None)
            installed.identity.declare({})

    # --- the platform -----------------------------------------------------------------------------------

    def platform(self) -> "Platform":
        """The installed platform; installed from settings on first use, re-installed after a platform key
        of ``%llm_config`` changed."""
        import tidyllm
        from tidyllm.errors import TidyLLMError
        from tidyllm.platform import current

        installed = current()
        if installed is not None and not self._reinstall:
            self._identify(installed)
            return installed
        overrides = {name: getattr(self, name) for name in _PLATFORM_TRAITS[1:] if getattr(self, name) is not None}
        base: Any = self.settings_file
        if base is None and installed is not None:
            base = installed.settings
        try:
            platform = tidyllm.install(base, **overrides)
        except TidyLLMError as exc:
            raise UsageError(f"cannot install tidyllm: {exc}") from None
        self._reinstall = False
        self._identify(platform)
        return platform

    def _watch(self, platform: "Platform") -> _call.SettleWatch:
        """This platform's settlement listener (registered with its governor on first use)."""
        if id(platform) not in self._watches:
            watch = _call.SettleWatch()
            platform.governor.add_listener(watch)
            self._watches[id(platform)] = (platform, watch)
        return self._watches[id(platform)][1]

    def close(self) -> None:
        """Detach the settlement listeners (``%unload_ext tidyllm``)."""
        for platform, watch in self._watches.values():
            platform.governor.remove_listener(watch)
        self._watches.clear()

    def _adhoc_router(self, platform: "Platform", model: str) -> Any:
        key = (id(platform), model)
        if key not in self._adhoc:
            self._adhoc[key] = _call.adhoc_router(platform, model)
        return self._adhoc[key]

    def _context(self, args: Any) -> dict[str, str]:
        values = {"user": args.user, "department": args.department, "reason": args.reason,
                  "use_case": args.use_case, "sensitivity": args.sensitivity}
        return {key: value for trait, key in _CONTEXT.items()
                if (value := values[trait] if values[trait] is not None else getattr(self, trait)) is not None}

    # --- %%llm -------------------------------------------------------------------------------------------

    @magic_arguments()
    @kwds(add_help=False)
    @argument("-m", "--model", help="model group (e.g. chat), gateway endpoint or LiteLLM model name "
                                    "(default: %%llm_config model, else chat)")
    @argument("--route", help="a gateway endpoint to use (e.g. chat-small), bypassing the router's choice")
    @argument("--mock", metavar="TEXT", help="LiteLLM mock_response: no provider is called, the call is still "
                                             "governed, costed and audited")
    @argument("-u", "--user", help="user_id (default: %%llm_config user)")
    @argument("-d", "--department", help="department (default: %%llm_config department)")
    @argument("-r", "--reason", help="audit_reason (default: %%llm_config reason)")
    @argument("--use-case", help="use case, e.g. qa, summarise, code, analysis, extraction")
    @argument("--sensitivity", help="data sensitivity, e.g. public, internal, confidential, restricted")
    @argument("-s", "--system", help="system prompt")
    @argument("-t", "--temperature", type=float, help="sampling temperature, 0 to 2")
    @argument("--max-tokens", type=int, help="cap on the answer's tokens (governance may lower it to fit a budget)")
    @argument("-f", "--format", type=str.lower, choices=_render.FORMATS,
              help="render as markdown (default), text, code (into the next cell), json or html")
    @argument("-o", "--output", metavar="NAME", help="bind LiteLLM's response object to NAME")
    @argument("--stream", action="store_true", help="show tokens as they arrive")
    @argument("--no-receipt", action="store_true", help="no receipt line under the answer")
    @argument("-h", "--help", action="store_true", help="list every tidyllm magic and option")
    @line_cell_magic
    def llm(self, line: str, cell: str | None = None) -> Any:
        """Send the cell to an LLM through tidyllm's governed path and render the answer.

        The cell is the prompt; ``{name}`` interpolates variables (``{In[3]}``, ``{Out[3]}``, ``{df.shape}``),
        unknown names stay as written. Below the answer: route, tokens, cost, the tightest budget's
        remaining amount and latency, as the mart recorded them."""
        if cell is None:
            if line.strip() not in ("", "-h", "--help"):
                raise UsageError("%%llm is a cell magic: put the prompt in the cell under `%%llm [options]` "
                                 "(see %llm --help)")
            print(self.help_text())
            return None
        args = _parse(self.llm, line)
        if args.help:
            print(self.help_text())
            return None
        cell = cell.strip("\n").rstrip()  # the cell's trailing newline is not part of the prompt
        if not cell.strip():
            raise UsageError("the cell is empty: write the prompt under the %%llm line")
        fmt = args.format or self.format
        temperature = args.temperature if args.temperature is not None else self.temperature
        max_tokens = args.max_tokens if args.max_tokens is not None else self.max_tokens
        if temperature is not None and not 0.0 <= temperature <= 2.0:
            raise UsageError(f"-t/--temperature must be between 0 and 2, got {temperature:g}")
        if max_tokens is not None and max_tokens < 1:
            raise UsageError(f"--max-tokens must be a positive integer, got {max_tokens}")
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o/--output needs a Python variable name, got {args.output!r}")

        platform = self.platform()
        watch = self._watch(platform)  # before the call: its settlement may be recorded before it returns
        target = _call.resolve_target(platform, args.model or self.model, args.route,
                                      model_given=args.model is not None,
                                      adhoc=lambda name: self._adhoc_router(platform, name))
        prompt = _render.instruct(_render.interpolate(cell, self.shell.user_ns), fmt)
        system = args.system if args.system is not None else self.system
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        context = self._context(args)
        metadata = dict(context)
        call_id = _call.name_call(metadata)
        show_receipt = self.receipt and not args.no_receipt
        stream_sink = self._stream_sink() if args.stream else None
        try:
            response = _call.complete(target, messages=messages, metadata=metadata, stream=args.stream,
                                      on_token=stream_sink.token if stream_sink else None,
                                      temperature=temperature, max_tokens=max_tokens, mock_response=args.mock)
        except Exception as exc:
            message = _call.explain(exc, platform, target)
            if message is None:
                raise
            raise UsageError(message) from None
        finally:
            if stream_sink is not None:
                stream_sink.close()
        from tidyllm.litellm_bridge.records import answer_text

        text = answer_text(response)
        self.last_call_id = call_id
        receipt = (_call.receipt_for(platform, call_id, context, target.model, watch,
                                     self.settle_timeout) if show_receipt else None)
        if receipt is not None:
            self.last_call_id = receipt.call_id  # the attempt that answered (a Router retry is <id>#<n>)
        if args.output:
            self.shell.user_ns[args.output] = response
        if fmt == "code":
            self.shell.set_next_input(_render.extract_code(text), replace=False)
        result = _render.LLMResult(text=text, format=fmt, response=response, receipt=receipt)
        buttons = _render.feedback_buttons(self.last_call_id, platform.feedback, self.shell)
        if stream_sink is None:
            if buttons is None:
                return result
            display(result)
            display(buttons)
            return None
        stream_sink.finish(result)
        return None

    def _stream_sink(self) -> "_render.StreamSink":
        mode = self.stream_display
        if mode == "auto":
            # in a Jupyter kernel a display can be updated in place; a terminal prints tokens as they come
            mode = "update" if getattr(self.shell, "kernel", None) is not None else "print"
        return _render.StreamSink(mode)

    # --- %llm_config -------------------------------------------------------------------------------------

    @line_magic
    def llm_config(self, line: str) -> None:
        """``%llm_config key=value ...`` sets notebook defaults; bare, shows them. ``key=`` clears one.

        Keys: user, department, reason, use_case, sensitivity, model, system, temperature, max_tokens,
        format, receipt, and for the platform config (a tidyllm.yaml), database_url, gateway_uri,
        gateway_mode, gateway_config (changing one re-installs the platform on the next call)."""
        if not line.strip():
            self._show_config()
            return
        try:
            tokens = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%llm_config: {exc} in {line.strip()!r}; quote values with spaces: "
                             'reason="MVR peer review"') from None
        changes: dict[str, Any] = {}
        for token in tokens:
            key, sep, raw = token.partition("=")
            name = CONFIG_KEYS.get(key.strip().lower().replace("-", "_"))
            if not sep or name is None:
                raise UsageError(f"%llm_config expects key=value with a key among {', '.join(_SHOWN)}; "
                                 f"got {token!r}")
            trait = self.traits()[name]
            if raw == "":
                changes[name] = trait.default_value
                continue
            try:
                changes[name] = trait.from_string(raw)
            except (TraitError, ValueError) as exc:
                raise UsageError(f"%llm_config {key}: {exc}") from None
        # validate every value before applying any, so a bad line changes nothing
        probe = LLMMagics(shell=None)
        for name, value in changes.items():
            try:
                setattr(probe, name, value)
            except TraitError as exc:
                raise UsageError(f"%llm_config {name}: {_trait_message(exc)}") from None
        for name, value in changes.items():
            setattr(self, name, value)

    def _show_config(self) -> None:
        from tidyllm.platform import current

        installed = current()
        defaults = dict(installed.settings.defaults) if installed is not None else {}
        lines = ["tidyllm notebook defaults (%llm_config key=value sets one, key= clears it):"]
        for key in _SHOWN:
            name = CONFIG_KEYS[key]
            value = getattr(self, name)
            shown = "" if value is None else str(value)
            if name in ("database_url", "gateway_uri") and value is not None:
                from tidyllm.settings import mask_url

                shown = mask_url(shown)  # a URL's password is never printed into a notebook
            if value is None and name in _CONTEXT and defaults.get(_CONTEXT[name]):
                shown = f"{defaults[_CONTEXT[name]]}  (from the platform's settings)"
            lines.append(f"  {key:<15} {shown}")
        if installed is None:
            lines.append("platform: not installed yet; the first %%llm installs it from tidyllm.yaml / TIDYLLM_* "
                         "settings")
        else:
            pending = " (re-installs on the next call)" if self._reinstall else ""
            lines.append(f"platform: {installed!r}{pending}")
            session = installed.identity.session
            if session is not None:
                lines.append(f"identity: {installed.identity.mode}; notebook user {session.user_id!r} "
                             f"({session.source})")
        print("\n".join(lines))

    # --- %llm_budget -------------------------------------------------------------------------------------

    @magic_arguments()
    @argument("-d", "--department", help="only the budgets a call of this department counts against")
    @argument("-u", "--user", help="only the budgets a call of this user counts against")
    @argument("--plot", action="store_true", help="bar chart of spent / reserved / remaining per budget")
    @line_magic
    def llm_budget(self, line: str) -> Any:
        """Budget status for the current window of each budget (spent, reserved, remaining), as a DataFrame."""
        args = _parse(self.llm_budget, line)
        platform = self.platform()
        status = platform.budgets.status()
        if args.department or args.user:
            from tidyllm.governance.context import CallContext
            from tidyllm.governance.names import normalize_name

            ctx = CallContext(user_id=normalize_name(args.user) if args.user else None,
                              department=normalize_name(args.department) if args.department else None)
            keep = {(b["scope"], b["name"], b["period"])
                    for b in platform.budgets.applicable(status.to_dict("records"), ctx, None, None)}
            status = status[[(s, n, p) in keep for s, n, p in zip(status["scope"], status["name"], status["period"])]]
            status = status.reset_index(drop=True)
        if status.empty:
            print("no budgets apply; set one with `tidyllm budget set department NAME USD` or "
                  "platform.budgets.set('department', NAME, USD)")
        elif args.plot:
            display(Image(data=_render.figure_png(_render.budget_figure(status)), format="png"))
        return status

    # --- %llm_routes -------------------------------------------------------------------------------------

    @magic_arguments()
    @argument("-d", "--department", help="the router's preference for this department only")
    @argument("--use-case", help="the router's preference for this use case only")
    @line_magic
    def llm_routes(self, line: str) -> None:
        """Endpoint health (circuit state, calls, error rate, p50 latency, prices) and the router's
        preferred endpoint per context (department, use case, model group)."""
        args = _parse(self.llm_routes, line)
        platform = self.platform()
        display(_render.Note("Endpoint health", "**Endpoint health**"))
        display(_call.health_frame(platform))
        display(_render.Note("Router preference per context", "**Router preference per context**"))
        display(_call.preference_frame(platform, self._route_contexts(platform, args)))

    def _route_contexts(self, platform: "Platform", args: Any) -> list[dict[str, Any]]:
        if args.department or args.use_case:
            from tidyllm.governance.names import normalize_name

            department = normalize_name(args.department) if args.department else None
            return [{k: v for k, v in (("department", department), ("use_case", args.use_case)) if v}]
        # the contexts calls came from (newest first) and the notebook's own
        calls = platform.mart.frame("llm_calls", columns=["department", "use_case"], order_by="-started_at",
                                    limit=2000)
        seen: list[dict[str, Any]] = []
        own = {k: v for k, v in (("department", self.department), ("use_case", self.use_case)) if v}
        for ctx in [own, *({k: v for k, v in (("department", d), ("use_case", u)) if isinstance(v, str)}
                           for d, u in zip(calls["department"], calls["use_case"]))]:
            if ctx not in seen:
                seen.append(ctx)
        return seen[:20]

    # --- %llm_audit --------------------------------------------------------------------------------------

    @magic_arguments()
    @argument("-n", type=int, default=10, help="how many of the newest rows (default 10)")
    @argument("-u", "--user", help="only this user's rows")
    @argument("-d", "--department", help="only this department's rows")
    @argument("--verify", action="store_true", help="re-compute the hash chain and report its state")
    @line_magic
    def llm_audit(self, line: str) -> Any:
        """The newest audit rows as a DataFrame; ``--verify`` checks the whole hash chain first."""
        args = _parse(self.llm_audit, line)
        if args.n < 1:
            raise UsageError(f"-n must be a positive number of rows, got {args.n}")
        platform = self.platform()
        if args.verify:
            print(platform.audit.verify())
        from tidyllm.governance.names import normalize_name

        filters = {k: normalize_name(v) for k, v in (("user_id", args.user), ("department", args.department)) if v}
        frame = platform.audit.frame(limit=args.n, **filters)
        columns = ["seq", "recorded_at", "call_id", "user_id", "department", "audit_reason", "use_case",
                   "requested_model", "route", "decision", "rule", "status", "prompt_tokens", "completion_tokens",
                   "cost_usd", "latency_ms"]
        return frame[[c for c in columns if c in frame.columns]]

    # --- %llm_feedback -------------------------------------------------------------------------------

    @line_magic
    def llm_feedback(self, line: str) -> None:
        """Score the last %%llm answer: ``%llm_feedback 👍|👎|0.7 [comment]`` (also +1/-1, up/down).

        The score is human feedback in [0, 1] on that call; the learning router learns it once (a second
        score for the same call is ignored)."""
        parts = line.strip().split(None, 1)
        if not parts:
            raise UsageError("usage: %llm_feedback 👍|👎|0.7 [comment] (scores the last %%llm answer)")
        if self.last_call_id is None:
            raise UsageError("no %%llm answer to score yet in this session: run a %%llm cell first")
        score = _feedback_score(parts[0])
        comment = parts[1].strip() if len(parts) > 1 else None
        platform = self.platform()
        platform.feedback(self.last_call_id, score, comment=comment)
        print(f"feedback {score:g} recorded for call {self.last_call_id}")

    # --- help ----------------------------------------------------------------------------------------------

    def help_text(self) -> str:
        """Everything the extension offers (``%llm --help``), from the magics' own option parsers."""
        sections = ["tidyllm magics: governed LLM calls (budgets, authorisation, audit, learning router) "
                    "in a notebook.", ""]
        # the cell magic's parser is named after the function; its usage line reads %llm
        sections.append(self.llm.parser.format_help().replace("\n  %llm ", "\n  %%llm ", 1))
        sections.append("::\n\n  %llm_config [key=value ...]\n\n" + _dedent(self.llm_config.__doc__ or ""))
        for magic in (self.llm_budget, self.llm_routes, self.llm_audit):
            sections.append(magic.parser.format_help())
        sections.append("::\n\n  %llm_feedback 👍|👎|0.7 [comment]\n\n" + _dedent(self.llm_feedback.__doc__ or ""))
        sections.append("::\n\n  %llm --help\n\nThis text. Defaults for every notebook: c.LLMMagics.<trait> in "
                        "ipython_config.py (%config LLMMagics lists them).")
        return "\n".join(sections)


def _parse(magic: Any, line: str) -> Any:
    """Parse a magic's options with POSIX quoting (IPython's own splitting keeps the quotes in
    ``--mock "two words"``); a bad option or quote is a ``UsageError``."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{exc} in {line.strip()!r}") from None
    return magic.parser.parse_args(argv)


def _dedent(text: str) -> str:
    import textwrap

    first, _, rest = text.partition("\n")
    return first.strip() + "\n" + textwrap.dedent(rest) + "\n"


def _trait_message(exc: TraitError) -> str:
    return str(exc).split("\n", 1)[0]


_THUMBS = {"👍": 1.0, "+1": 1.0, "up": 1.0, "good": 1.0, "👎": 0.0, "-1": 0.0, "down": 0.0, "bad": 0.0}


def _feedback_score(token: str) -> float:
    """👍 → 1, 👎 → 0, or a number in [0, 1]; anything else is a ``UsageError``."""
    key = token.strip().rstrip("\ufe0f").lower()
    if key in _THUMBS:
        return _THUMBS[key]
    try:
        score = float(key)
    except ValueError:
        raise UsageError(f"%llm_feedback takes 👍, 👎 or a score in [0, 1] first, got {token!r}") from None
    if not 0.0 <= score <= 1.0:
        raise UsageError(f"a feedback score is in [0, 1] (1 = excellent), got {token}")
    return score
