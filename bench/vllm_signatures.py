"""Writes the snapshot of vLLM's API that the vLLM rollout adapter is contract-tested against.

    python bench/vllm_signatures.py                      # vllm 0.33.0, fetched with pip download
    python bench/vllm_signatures.py --wheel vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl

The wheel is read as a zip and its sources parsed with ast: nothing from it is imported or
run, so this works on a machine where vllm cannot be imported (no GPU, another torch). The
JSON holds the signatures of the LLM methods the adapter calls, of the worker methods it
reaches by name through LLM.collective_rpc, the fields of SamplingParams, EngineArgs (what
LLM(**kwargs) forwards), the output classes the adapter reads, and the literal values of the
options it sets. tests/test_vllm_contract.py binds every call the adapter makes against it.
"""

import argparse
import ast
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

LLM_METHODS = ["__init__", "generate", "sleep", "wake_up", "reset_prefix_cache", "collective_rpc"]
# (snapshot name, file in the wheel, class, method): what collective_rpc("reload_weights") runs. The
# worker's method forwards its arguments to the model runner's, whose signature is the one that binds;
# the CPU build's worker and runner subclass these two.
WORKER_METHODS = [
    ("Worker.reload_weights", "vllm/v1/worker/gpu_worker.py", "Worker", "reload_weights"),
    ("GPUModelRunner.reload_weights", "vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner", "reload_weights"),
]
# (snapshot name, file in the wheel, class name): classes whose annotated fields are their constructor.
FIELD_CLASSES = [
    ("SamplingParams", "vllm/sampling_params.py", "SamplingParams"),
    ("EngineArgs", "vllm/engine/arg_utils.py", "EngineArgs"),
    ("Logprob", "vllm/logprobs.py", "Logprob"),
    ("CompletionOutput", "vllm/outputs.py", "CompletionOutput"),
    ("TokensPrompt", "vllm/inputs/llm.py", "TokensPrompt"),
]
# Plain classes whose __init__ sets the attributes the adapter reads.
INIT_CLASSES = [("RequestOutput", "vllm/outputs.py", "RequestOutput")]
LITERALS = [
    ("LogprobsMode", "vllm/config/model.py"),
    ("DistributedExecutorBackend", "vllm/config/parallel.py"),
    ("LoadFormats", "vllm/model_executor/model_loader/__init__.py"),  # EngineArgs.load_format: str | LoadFormats
]
CONSTANTS = [("DEFERRABLE_TAGS", "vllm/device_allocator/__init__.py")]
_KINDS = [("posonlyargs", "POSITIONAL_ONLY"), ("args", "POSITIONAL_OR_KEYWORD")]


def download_wheel(version, directory):
    """Path of vllm==version's wheel, fetched by pip (no dependencies) into directory."""
    subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "--only-binary=:all:",
                    "--quiet", "-d", directory], check=True)
    wheels = glob.glob(os.path.join(directory, f"vllm-{version}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no vllm-{version} wheel in {directory}")
    return wheels[0]


def parse(archive, path):
    return ast.parse(archive.read(path).decode("utf-8"), filename=path)


def find_class(tree, name):
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise SystemExit(f"class {name} not found")


def _source(node):
    return None if node is None else ast.unparse(node)


def _is_overload(function):
    return any(_source(decorator).endswith("overload") for decorator in function.decorator_list)


def method_parameters(cls, name):
    """The parameters of cls.name (its implementation when it has @overload variants), self included."""
    candidates = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name and not _is_overload(n)]
    if not candidates:
        raise SystemExit(f"{cls.name}.{name} not found")
    arguments = candidates[-1].args
    positional = [(arg, kind) for field, kind in _KINDS for arg in getattr(arguments, field)]
    defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    parameters = [_parameter(arg, kind, default) for (arg, kind), default in zip(positional, defaults)]
    if arguments.vararg:
        parameters.append(_parameter(arguments.vararg, "VAR_POSITIONAL", None))
    for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults):
        parameters.append(_parameter(arg, "KEYWORD_ONLY", default))
    if arguments.kwarg:
        parameters.append(_parameter(arguments.kwarg, "VAR_KEYWORD", None))
    return parameters


def _parameter(arg, kind, default):
    return {"name": arg.arg, "kind": kind, "has_default": default is not None, "default": _source(default),
            "annotation": _source(arg.annotation)}


def _field_default(value):
    """(has a default, accepted by the constructor) for an annotated class attribute's value."""
    if value is None:
        return False, True
    if isinstance(value, ast.Call) and _source(value.func).split(".")[-1] == "field":
        options = {keyword.arg: keyword.value for keyword in value.keywords}
        init = not (isinstance(options.get("init"), ast.Constant) and options["init"].value is False)
        return "default" in options or "default_factory" in options, init
    return True, True


def class_fields(cls):
    """Annotated attributes in order: the constructor of a dataclass, msgspec Struct or TypedDict."""
    fields = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        annotation = _source(node.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        has_default, init = _field_default(node.value)
        if init:
            fields.append({"name": node.target.id, "has_default": has_default, "annotation": annotation})
    return fields


def module_value(tree, name):
    """The expression assigned to a module-level name (the last assignment with a value)."""
    found = None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if getattr(node, "value", None) is not None and any(isinstance(t, ast.Name) and t.id == name for t in targets):
            found = node.value
    if found is None:
        raise SystemExit(f"module-level {name} not found")
    return found


def module_literal(tree, name):
    """The values of a module-level `name = Literal[...]`."""
    value = module_value(tree, name)
    elements = value.slice.elts if isinstance(value.slice, ast.Tuple) else [value.slice]
    return [element.value for element in elements]


def module_constant(tree, name):
    return ast.literal_eval(module_value(tree, name))


def snapshot(wheel_path):
    with zipfile.ZipFile(wheel_path) as archive:
        llm = find_class(parse(archive, "vllm/entrypoints/llm.py"), "LLM")
        methods = {f"LLM.{name}": method_parameters(llm, name) for name in LLM_METHODS}
        for label, path, name, method in WORKER_METHODS:
            methods[label] = method_parameters(find_class(parse(archive, path), name), method)
        for label, path, name in INIT_CLASSES:
            methods[f"{label}.__init__"] = method_parameters(find_class(parse(archive, path), name), "__init__")
        fields = {label: class_fields(find_class(parse(archive, path), name)) for label, path, name in FIELD_CLASSES}
        literals = {name: module_literal(parse(archive, path), name) for name, path in LITERALS}
        constants = {name: module_constant(parse(archive, path), name) for name, path in CONSTANTS}
        version = module_constant(parse(archive, "vllm/_version.py"), "__version__")
    with open(wheel_path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    return {"vllm_version": version, "wheel": os.path.basename(wheel_path), "wheel_sha256": digest,
            "generated_by": "python bench/vllm_signatures.py", "methods": methods, "fields": fields,
            "literals": literals, "constants": constants}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="0.33.0")
    parser.add_argument("--wheel", help="a vllm wheel already on disk (default: pip download into a temporary folder)")
    parser.add_argument("--out", help="default tests/data/vllm_<version>_signatures.json")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                   f"vllm_{args.version.replace('.', '_')}_signatures.json")
    if args.wheel:
        data = snapshot(args.wheel)
    else:
        with tempfile.TemporaryDirectory(prefix="vllm_wheel_") as directory:
            data = snapshot(download_wheel(args.version, directory))
    if data["vllm_version"] != args.version:
        raise SystemExit(f"the wheel is vllm {data['vllm_version']}, not {args.version}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
    print(f"wrote {os.path.normpath(out)}: {len(data['methods'])} methods, "
          f"{sum(len(f) for f in data['fields'].values())} fields, from {data['wheel']}")


if __name__ == "__main__":
    main()
