"""The one exception type users see: its message is a single line naming the problem and the fix."""


class SunEdgeError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2.

    Messages are one line: what is wrong, and what to do about it. Where the fix is a setting,
    the library says it in its own terms and names it with ``fix``, a key of ``FIXES``: a shell
    (the CLI, a server) shows its own words for that key instead (the CLI: the flag to pass),
    so no user is told about flags their interface does not have. ``str(error)`` is the
    library's wording.
    """

    def __init__(self, problem: str, *, fix: str | None = None) -> None:
        if fix is not None and fix not in FIXES:
            raise ValueError(f"unknown fix {fix!r}; known: {', '.join(FIXES)}")
        self.problem, self.fix = problem, fix
        super().__init__(problem + (FIXES[fix] if fix else ""))

    def render(self, fixes: dict[str, str]) -> str:
        """The message with a shell's own words for the fix, where it has them."""
        if self.fix is None or self.fix not in fixes:
            return str(self)
        return self.problem + fixes[self.fix]


# The library's words for each fix; each includes its separator. The CLI's are in sun_edge/cli.py.
FIXES: dict[str, str] = {
    "adapter": ": give a SUN adapter file (adapter)",
    "adapter_or_cfg": ": give a SUN adapter file (adapter), or use mode cfg",
    "load_tiny": ": load one (vae_decoder tiny:PATH)",
    "export_tiny": "; re-export it with a TAESD decoder, or decode with the full VAE (vae_decoder full)",
    "export_baseline": "; re-export it with the baseline UNet (with_baseline)",
    "coreml_cfg": ": CFG mode needs the UNet without the adapter: use an ONNX bundle exported with the baseline UNet, "
                  "or the model itself",
    "model_path": " or give the model's path",
    "allow_pickle": "; convert it to .safetensors, or allow pickle files (allow_pickle) if you trust it",
}


def first_names(names: list[str] | tuple[str, ...], n: int = 3) -> str:
    """``"a, b, c, ..."``: the first ``n`` names of a list, for one-line error messages."""
    shown = ", ".join(names[:n])
    return shown + (", ..." if len(names) > n else "")


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name if it has none), for one-line errors
    that wrap a library's multi-line exception."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
