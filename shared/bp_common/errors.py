"""One error type, one catalog of codes, one exit code per code (sysexits.h).

Every `BpError` carries a code from CATALOG. The catalog is the single source for
docs/error-codes.md (generated) and for the exit code a tool returns.
"""
from __future__ import annotations

from dataclasses import dataclass

# Exit codes (sysexits.h plus the shell's signal convention).
EXIT_OK = 0
EXIT_PARTIAL = 3
EXIT_USAGE = 2
EXIT_DATAERR = 65
EXIT_INPUT = 64
EXIT_NOINPUT = 66
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
EXIT_CANTCREAT = 73
EXIT_IOERR = 74
EXIT_TEMPFAIL = 75
EXIT_NOPERM = 77
EXIT_SIGINT = 130
EXIT_OOM = 137
EXIT_SIGTERM = 143

EXIT_MEANINGS = {
    0: "ok",
    2: "command-line usage error",
    3: "partial success: some of several actions failed",
    64: "bad input or setting",
    65: "bad data, or a quality gate rejected",
    66: "input not found",
    69: "service unavailable (Ollama down, hub unreachable, dependency missing)",
    70: "internal bug",
    73: "cannot create output",
    74: "I/O error (disk full)",
    75: "temporary failure, retry later",
    77: "permission denied",
    130: "interrupted by SIGINT",
    137: "out of memory after recovery gave up",
    143: "terminated by SIGTERM",
}


@dataclass(frozen=True)
class CodeInfo:
    exit_code: int
    retryable: bool
    meaning: str
    hint: str


def _c(exit_code: int, meaning: str, hint: str, retryable: bool = False) -> CodeInfo:
    return CodeInfo(exit_code, retryable, meaning, hint)


# code -> CodeInfo. Families: INPUT, DATASET, CONFIG, DEP, RUNTIME, GPU, TRAIN, EXPORT,
# OLLAMA, HUB, STATE, EVAL, SLAO, PARTIAL. Keep each family together and sorted.
CATALOG: dict[str, CodeInfo] = {
    # --- INPUT: what the user pointed us at -------------------------------------------
    "INPUT_USAGE": _c(2, "the command line could not be parsed", "run the tool with --help"),
    "INPUT_INVALID": _c(64, "an argument has an invalid value", "check the value against --help"),
    "INPUT_NOT_FOUND": _c(66, "a file, directory or model named on the command line does not exist",
                          "check the path (relative paths are taken from the current directory)"),
    "INPUT_EMPTY": _c(66, "no input: stdin was empty or a TTY and no path was given",
                      "pass a path, or pipe a manifest from the previous tool"),
    "INPUT_MANIFEST_INVALID": _c(64, "the input manifest is not valid JSON or lacks required fields",
                                 "pass the manifest.json a bp-* tool wrote, unedited"),
    "INPUT_MANIFEST_KIND": _c(64, "the input manifest is of a kind this tool does not take",
                              "check the order of the pipeline: prep | vram | train | merge | gguf | ollama"),
    "INPUT_MANIFEST_VERSION": _c(64, "the input manifest has a newer schema_version than this tool understands",
                                 "upgrade the bp-* tools so all of them are the same version"),
    "INPUT_NAME_INVALID": _c(64, "a name (model, run id, tag) contains characters that are not allowed",
                             "use letters, digits and . _ : - only, not starting with - or ."),
    "INPUT_PICKLE_REFUSED": _c(64, "weights are stored as pickle (.bin/.pt), which can run code when loaded",
                               "convert them to safetensors, or pass --allow-pickle if you trust the source"),
    "INPUT_REMOTE_CODE_REFUSED": _c(64, "the model needs custom Python code from its repository",
                                    "pass --trust-remote-code only if you trust the repository"),
    "INPUT_PERMISSION": _c(77, "an input could not be read: permission denied", "check file permissions"),
    # --- DATASET: the rows themselves ---------------------------------------------------
    "DATASET_PARSE_FAILED": _c(65, "a dataset file could not be parsed (the line or row is named)",
                               "fix the row, or pass --skip-invalid to drop unparseable rows"),
    "DATASET_ENCODING": _c(65, "a dataset file is not UTF-8 text (binary, UTF-16 or Latin-1)",
                           "re-encode it: iconv -f LATIN1 -t UTF-8 in > out"),
    "DATASET_EMPTY": _c(65, "the dataset has no usable rows", "check the file and the filters that dropped rows"),
    "DATASET_FORMAT_UNKNOWN": _c(65, "the row format could not be detected",
                                 "pass --format, or see docs/datasets.md for the accepted shapes"),
    "DATASET_FORMAT_UNSUPPORTED": _c(65, "the data does not have the fields this method needs",
                                     "use the bp-prep view the method needs (see docs/datasets.md)"),
    "DATASET_VALIDATION_FAILED": _c(65, "rows failed validation (the list is in details)",
                                    "fix the rows, or pass --skip-invalid to drop them"),
    "DATASET_TEMPLATE_FAILED": _c(65, "the model's chat template could not render these rows",
                                  "check roles and content types, or pass --format"),
    "DATASET_GATE_FAILED": _c(65, "the dataset report failed a quality gate",
                              "clean the data, or relax the threshold named in the message"),
    "DATASET_ENGINE_MISSING": _c(69, "reading this file type needs a package that is not installed",
                                 "pip install pandas pyarrow (or use JSONL)"),
    # --- CONFIG: settings and their combinations -----------------------------------------
    "CONFIG_INVALID": _c(64, "the --config file or an environment variable is invalid",
                         "fix the file or variable named in the message"),
    "CONFIG_INVALID_SETTING": _c(64, "a setting or a combination of settings is not allowed",
                                 "change the setting named in the message"),
    "CONFIG_NO_CHAT_TEMPLATE": _c(64, "the tokenizer has no chat template",
                                  "use an instruct model, or pass --template FILE"),
    # --- DEP: something we rely on is missing ---------------------------------------------
    "DEP_MISSING": _c(69, "an optional Python package needed for this feature is not installed",
                      "install the package named in the message"),
    "DEP_QUANTIZER_MISSING": _c(69, "k-quants need llama-cpp-python, which is not installed",
                                "pip install 'backpropagate-tools[llama]' (or use f16/q8_0/q4_0)"),
    "DEP_NCCL_MISSING": _c(69, "FSDP CPU offload needs CUDA with NCCL", "run on Linux with CUDA, or use LoRA"),
    "DEP_MODEL_LOAD_FAILED": _c(69, "the model could not be loaded", "check the model name or path", retryable=True),
    # --- HUB: huggingface-hub --------------------------------------------------------------
    "HUB_UNREACHABLE": _c(69, "the Hugging Face hub could not be reached",
                          "check the network, or set HF_HUB_OFFLINE=1 to use the local cache", retryable=True),
    "HUB_NOT_FOUND": _c(66, "the model or dataset is not on the hub or not in the local cache",
                        "check the id; in offline mode download it first with huggingface-cli download"),
    "HUB_AUTH": _c(77, "the hub refused access (gated or private repository)",
                   "accept the licence on the hub and set HF_TOKEN or run huggingface-cli login"),
    # --- RUNTIME: the process and the machine --------------------------------------------
    "RUNTIME_INTERNAL": _c(70, "an internal error (a bug in bp-*)",
                           "run again with --verbose and report it (docs/bug-reporting.md)"),
    "RUNTIME_INTERRUPTED": _c(130, "interrupted by SIGINT", "run again; training resumes with --resume latest"),
    "RUNTIME_TERMINATED": _c(143, "terminated by SIGTERM", "run again; training resumes with --resume latest"),
    "RUNTIME_OOM": _c(137, "out of memory", "lower --batch-size or --seq-len, or enable OOM recovery"),
    "RUNTIME_OOM_RECOVERY_EXHAUSTED": _c(137, "out of memory three times at batch size 1",
                                         "lower --seq-len, use --mode qlora, or a smaller model"),
    "RUNTIME_OUTPUT_UNWRITABLE": _c(73, "the output could not be created",
                                    "check that the parent directory exists and is writable"),
    "RUNTIME_DISK_FULL": _c(74, "no space left on the device", "free disk space; nothing was left under a final name",
                            retryable=True),
    "RUNTIME_IO_ERROR": _c(74, "an I/O error while reading or writing", "check the disk and the path", retryable=True),
    "RUNTIME_PERMISSION_DENIED": _c(77, "permission denied while writing", "check permissions of the output location"),
    # --- STATE: run directories, locks, checkpoints ----------------------------------------
    "STATE_LOCKED": _c(75, "another bp-* process holds the lock on this output directory",
                       "wait for it to finish, or use another --output", retryable=True),
    "STATE_CHECKPOINT_INVALID": _c(65, "a checkpoint is missing files or is corrupt",
                                   "resume from an earlier checkpoint or start again with --force"),
    "STATE_RUN_NOT_FOUND": _c(66, "no run with that id in this output directory",
                              "list runs with bp-train runs -o DIR"),
    "STATE_OUTPUT_EXISTS": _c(73, "the output directory holds results of different inputs or settings",
                              "pass --force to replace them, or choose another --output"),
    # --- GPU ---------------------------------------------------------------------------------
    "GPU_NOT_AVAILABLE": _c(69, "this needs a CUDA GPU and none was found",
                            "run on a machine with a GPU, or pick a CPU-capable mode"),
    "GPU_TEMPERATURE_CRITICAL": _c(75, "the GPU stayed too hot; a checkpoint was written",
                                   "improve cooling or lower the batch size, then --resume latest", retryable=True),
    "GPU_MONITOR_FAILED": _c(69, "GPU sensors could not be read", "pip install nvidia-ml-py, or pass --no-gpu-monitor"),
    # --- TRAIN ----------------------------------------------------------------------------------
    "TRAIN_FAILED": _c(70, "training failed", "run again with --verbose; the run id is in the message"),
    "TRAIN_DIVERGED": _c(65, "the loss became NaN or infinite", "lower --lr, check the data, or use bf16"),
    "TRAIN_FULL_FT_TOO_LARGE": _c(64, "the model is above the full fine-tuning ceiling for this card",
                                  "use --offload, --mode lora, or --full-ft-ceiling to override"),
    # --- EXPORT: merge and GGUF -----------------------------------------------------------------
    "EXPORT_UNSUPPORTED_ARCH": _c(64, "this model architecture cannot be exported",
                                  "see the supported list in the message"),
    "EXPORT_ADAPTER_MISMATCH": _c(65, "the adapter does not fit this base model (names or shapes differ)",
                                  "pass the base the adapter was trained on (--base)"),
    "EXPORT_ADAPTER_UNSUPPORTED": _c(64, "the adapter uses a PEFT feature that cannot be merged as W + scale·B·A",
                                     "merge LoRA, rsLoRA or DoRA adapters; see docs/export.md"),
    "EXPORT_BASE_UNSUPPORTED": _c(64, "the base model's weights cannot be merged into (stored quantized or in an "
                                  "unknown dtype)", "pass the full-precision base the adapter was trained from (--base)"),
    "EXPORT_WEIGHTS_INVALID": _c(65, "model weights are truncated, corrupt, or contain NaN/Inf",
                                 "re-download or re-create the weights"),
    "EXPORT_MERGE_MISMATCH": _c(65, "the merged model's logits differ from the adapter's beyond tolerance",
                                "report it with the manifest; use --dtype f32 to rule out precision"),
    "EXPORT_VERIFY_FAILED": _c(65, "the exported file does not reproduce the model (tokens or logits)",
                               "report it with the manifest; the file was not published"),
    "EXPORT_TOKENIZER_UNSUPPORTED": _c(64, "the tokenizer cannot be written to GGUF",
                                       "pass --pre-tokenizer NAME for an unknown BPE pre-tokenizer"),
    "EXPORT_FAILED": _c(70, "the export failed", "run again with --verbose"),
    # --- OLLAMA ---------------------------------------------------------------------------------
    "OLLAMA_UNAVAILABLE": _c(69, "the Ollama server did not answer", "start it with `ollama serve`, or pass --host",
                             retryable=True),
    "OLLAMA_CREATE_FAILED": _c(69, "Ollama refused to create the model", "read Ollama's message; check the GGUF"),
    "OLLAMA_BAD_REQUEST": _c(65, "Ollama rejected the request as invalid", "read Ollama's message"),
    "OLLAMA_NOT_FOUND": _c(66, "no such model in Ollama", "list models with bp-ollama list"),
    "OLLAMA_TEMPLATE_UNSUPPORTED": _c(65, "the chat template could not be translated to an Ollama TEMPLATE",
                                      "pass --template FILE with a Go template"),
    "OLLAMA_SERVER_ERROR": _c(69, "the Ollama server answered with an error, or not as Ollama does",
                              "read Ollama's message; check --host points at an Ollama server", retryable=True),
    # --- EVAL -----------------------------------------------------------------------------------
    "EVAL_REGRESSED": _c(65, "the candidate is worse than the baseline beyond the allowed margin",
                         "keep the baseline, or raise --max-regression"),
    # --- SLAO (multi-run) -----------------------------------------------------------------------
    "SLAO_MERGE_DIVERGED": _c(65, "a multi-run merge produced NaN or Inf",
                               "lower --lr-start, or continue from an earlier run's accumulated adapter"),
    # --- PARTIAL --------------------------------------------------------------------------------
    "PARTIAL_SUCCESS": _c(3, "some of several actions failed (each is listed in details)",
                          "read details for the failed items"),
}


class BpError(Exception):
    """The one exception type every bp-* tool raises for an expected failure."""

    def __init__(self, code: str, message: str, hint: str | None = None,
                 retryable: bool | None = None, details: dict | None = None):
        if code not in CATALOG:
            # A bug in our own code: never let an unknown code escape silently.
            raise ValueError(f"uncatalogued error code {code!r}")
        info = CATALOG[code]
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint if hint is not None else info.hint
        self.retryable = info.retryable if retryable is None else retryable
        self.details = details or {}
        self.exit_code = info.exit_code

    def envelope(self, tool: str) -> dict:
        from .redact import redact_obj
        return redact_obj({
            "schema_version": 1, "kind": "error", "code": self.code, "message": self.message,
            "hint": self.hint, "retryable": self.retryable, "exit_code": self.exit_code,
            "tool": tool, "details": self.details,
        })

    def line(self) -> str:
        from .redact import redact
        text = f"error[{self.code}]: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return redact(" ".join(text.split()))


class UpstreamFailure(Exception):
    """An error envelope arrived on stdin: re-emit it unchanged, exit with its code."""

    def __init__(self, envelope: dict):
        super().__init__(envelope.get("message", "upstream failure"))
        self.envelope = envelope
        code = envelope.get("exit_code")
        self.exit_code = code if isinstance(code, int) and 0 < code < 256 else EXIT_SOFTWARE


def from_os_error(exc: OSError, what: str, output: bool = False) -> BpError:
    """Map an OSError to the catalog code a user can act on.

    output=True when the failing operation was creating or writing an output: then a path
    that cannot be a directory or file there (a file in the way, a missing parent) is
    RUNTIME_OUTPUT_UNWRITABLE rather than an input or I/O problem.
    """
    import errno
    e = exc.errno
    if output and e in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG):
        return BpError("RUNTIME_OUTPUT_UNWRITABLE", f"{what}: {exc.strerror or exc}")
    if isinstance(exc, FileNotFoundError):
        return BpError("INPUT_NOT_FOUND", f"{what}: {exc.strerror or exc}: {exc.filename}")
    if e == errno.ENOSPC or e == getattr(errno, "EDQUOT", -1):
        return BpError("RUNTIME_DISK_FULL", f"{what}: no space left on device")
    if e in (errno.EACCES, errno.EPERM):
        return BpError("RUNTIME_PERMISSION_DENIED", f"{what}: permission denied: {exc.filename}")
    if e == errno.EROFS:
        return BpError("RUNTIME_OUTPUT_UNWRITABLE", f"{what}: read-only file system: {exc.filename}")
    return BpError("RUNTIME_IO_ERROR", f"{what}: {exc.strerror or exc}")
