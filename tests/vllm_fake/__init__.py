"""The committed snapshot of vLLM 0.33.0's API (tests/data, written by bench/vllm_signatures.py) as
inspect.Signature objects, and check_call, which raises TypeError for a call the real vLLM would refuse.

The fake `vllm` package beside this file (put on sys.path only by the contract tests' fixture)
checks every call with it, and the tests check every recorded call again.
"""

import inspect
import json
import os

SNAPSHOT = os.path.join(os.path.dirname(__file__), "..", "data", "vllm_0_33_0_signatures.json")
# Worker methods collective_rpc may name -> the signature their arguments bind to (the worker's own
# method forwards *args and **kwargs to the model runner's).
WORKER_METHODS = {"reload_weights": "GPUModelRunner.reload_weights"}
_NO_DEFAULT = inspect.Parameter.empty


def load_snapshot():
    with open(SNAPSHOT) as handle:
        return json.load(handle)


def method_signature(snapshot, name):
    """The signature of e.g. "LLM.generate", self included."""
    return inspect.Signature([
        inspect.Parameter(p["name"], getattr(inspect.Parameter, p["kind"]),
                          default=None if p["has_default"] else _NO_DEFAULT)
        for p in snapshot["methods"][name]
    ])


def fields(snapshot, cls, public=True):
    return [f for f in snapshot["fields"][cls] if not (public and f["name"].startswith("_"))]


def fields_signature(snapshot, cls):
    """Keyword-only constructor over the public fields (a private field is not ours to set)."""
    return inspect.Signature([
        inspect.Parameter(f["name"], inspect.Parameter.KEYWORD_ONLY, default=None if f["has_default"] else _NO_DEFAULT)
        for f in fields(snapshot, cls)
    ])


def _check_values(snapshot, name, arguments):
    literals, constants = snapshot["literals"], snapshot["constants"]
    options = {**arguments, **arguments.get("kwargs", {})} if name == "LLM.__init__" else arguments
    for option, literal in (("logprobs_mode", "LogprobsMode"), ("distributed_executor_backend",
                                                                 "DistributedExecutorBackend"),
                            ("load_format", "LoadFormats")):
        value = options.get(option)
        if option == "load_format" and isinstance(value, str):
            value = value.lower()  # LoadConfig lowercases it; a name outside LoadFormats needs a registered loader
        if option in options and value not in literals[literal]:
            raise TypeError(f"{name}: {option}={options[option]!r} is not one of {literals[literal]}")
    if name == "LLM.wake_up" and arguments.get("tags") is not None:
        unknown = set(arguments["tags"]) - set(constants["DEFERRABLE_TAGS"])
        if unknown:
            raise TypeError(f"LLM.wake_up: tags {sorted(unknown)} are not among {constants['DEFERRABLE_TAGS']}")
    if name == "LLM.sleep" and arguments.get("level", 1) not in (0, 1, 2):
        raise TypeError(f"LLM.sleep: level={arguments['level']!r} is not 0, 1 or 2")


def _check_prompts(snapshot, prompts):
    allowed = {f["name"] for f in fields(snapshot, "TokensPrompt")}
    for prompt in prompts if isinstance(prompts, (list, tuple)) else [prompts]:
        if isinstance(prompt, dict) and ("prompt_token_ids" not in prompt or set(prompt) - allowed):
            raise TypeError(f"LLM.generate: {sorted(prompt)} is not a TokensPrompt ({sorted(allowed)})")


def _check_worker_call(snapshot, arguments):
    """collective_rpc by name: the method must be one the snapshot holds, and its args and kwargs bind to it."""
    method = arguments["method"]
    if not isinstance(method, str):
        return
    if method not in WORKER_METHODS:
        raise TypeError(f"LLM.collective_rpc: {method!r} is not a worker method the snapshot holds "
                        f"({sorted(WORKER_METHODS)})")
    target = WORKER_METHODS[method]
    try:
        method_signature(snapshot, target).bind(None, *arguments.get("args", ()), **(arguments.get("kwargs") or {}))
    except TypeError as error:
        raise TypeError(f"LLM.collective_rpc({method!r}): {target}: {error}") from None


def check_call(snapshot, name, args, kwargs):
    """Raises TypeError unless name(*args, **kwargs) binds to vLLM 0.33.0 with valid option values.

    name: "SamplingParams" (the constructor) or "LLM.<method>" (args without self). LLM(**kwargs)
    forwards what its own signature does not name to EngineArgs, so those must be its fields;
    collective_rpc's args and kwargs must bind to the worker method it names.
    """
    if name == "SamplingParams":
        arguments = fields_signature(snapshot, "SamplingParams").bind(*args, **kwargs).arguments
    else:
        arguments = method_signature(snapshot, name).bind(None, *args, **kwargs).arguments
    if name == "LLM.__init__":
        engine_fields = {f["name"] for f in fields(snapshot, "EngineArgs")}
        unknown = sorted(set(arguments.get("kwargs", {})) - engine_fields)
        if unknown:
            raise TypeError(f"LLM.__init__: {unknown} are neither its parameters nor EngineArgs fields")
    if name == "LLM.generate":
        _check_prompts(snapshot, arguments["prompts"])
    if name == "LLM.collective_rpc":
        _check_worker_call(snapshot, arguments)
    _check_values(snapshot, name, arguments)
    return arguments
