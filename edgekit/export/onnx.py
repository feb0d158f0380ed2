"""ONNX format: optimum export -> onnxruntime graph optimization -> int8 quantization -> validation.

Heavy imports (torch, transformers, optimum) happen inside functions: this module is imported
only when a recipe has an ``onnx`` target.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np

from edgekit.errors import ExportError, RecipeError
from edgekit.export import BuildResult, ExportJob, reference
from edgekit.formats import TASKS
from edgekit.formats.onnx import SPEC as ONNX
from edgekit.runtime.encoder import MODEL_FILE, PAIR_SEPARATOR, TOKENIZER_FILE, EncoderModel, split_pair
from edgekit.schema.manifest import OnnxFacts, RuntimeConfig
from edgekit.schema.recipe import OnnxQuantization, OnnxTarget


def _exported_once(job: ExportJob, config: dict) -> Path:
    """The optimum export of the source, shared by every target of the recipe with the same opset."""
    key = ("optimum-export", job.target.opset)
    if key not in job.memo:
        job.progress("exporting with optimum")
        work = job.scratch / f"optimum-opset-{job.target.opset or 'default'}"
        job.memo[key] = _optimum_export(job.source.path, TASKS[job.recipe.task].export_task, job.target.opset, work)
    return job.memo[key]


def _optimum_export(source: Path, task: str, opset: int | None, work: Path) -> Path:
    from optimum.exporters.onnx import main_export

    try:
        # library_name="transformers": export the bare encoder even for sentence-transformers
        # checkpoints; pooling and normalization are done by the runtime from the manifest.
        main_export(
            # recipe task names are optimum's export task names (the head that is exported)
            str(source), output=work, task=task, opset=opset, library_name="transformers",
            do_validation=False, device="cpu",
        )
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ExportError(f"optimum could not export {source} for {task}: {exc}") from exc
    return work / MODEL_FILE


# config.json model_type -> onnxruntime transformer-optimizer model type (onnxruntime.transformers.optimizer).
# deberta-v2 (DeBERTa-v2/v3) under BERT's rules: SkipLayerNorm and BiasGelu fuse, its disentangled attention stays
# MatMuls; every weight MatMul is still quantized.
OPTIMIZER_MODEL_TYPES = {"bert": "bert", "distilbert": "bert", "roberta": "bert", "xlm-roberta": "bert", "mpnet": "bert", "electra": "bert",
                         "deberta-v2": "bert"}


def _optimize(model: Path, level: int, config: dict, out: Path) -> Path:
    """Bake onnxruntime's transformer fusions (attention core, LayerNorm, GELU) into the file.

    Attention is fused as MultiHeadAttention with the Q/K/V projections left as MatMul, so
    quantization still reaches those weights (the packed Attention op would hide them).
    """
    if level == 0:
        shutil.copy(model, out)
        return out
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = OPTIMIZER_MODEL_TYPES.get(config.get("model_type"))
    if model_type is None:
        raise ExportError(
            f"no onnxruntime fusion rules for model_type {config.get('model_type')!r}",
            hint=f"set optimization_level: 0 in the target, or use one of {', '.join(sorted(OPTIMIZER_MODEL_TYPES))}",
        )
    options = FusionOptions(model_type)
    options.use_multi_head_attention = True
    options.disable_multi_head_attention_bias = True
    optimized = optimize_model(
        str(model), model_type=model_type, num_heads=0, hidden_size=0, opt_level=min(level, 2), use_gpu=False,
        optimization_options=options,
    )
    optimized.save_model_to_file(str(out))
    return out


class _CalibrationReader:
    """Feeds calibration inputs one at a time to onnxruntime's calibrator."""

    def __init__(self, encoder_inputs: list[dict[str, np.ndarray]]) -> None:
        self._items = iter(encoder_inputs)

    def get_next(self):
        return next(self._items, None)


def _per_tensor_matmuls(graph, patterns: list[str]) -> list[str]:
    """Names of the MatMul nodes matched by any of the glob ``patterns``."""
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]


def _quantize_blockwise(model: Path, spec: OnnxQuantization, out: Path) -> Path:
    """8-bit MatMul weights in blocks, int8 compute with activations quantized per block (accuracy level 4).

    MatMuls matched by ``spec.per_tensor_matmuls`` are left as MatMul for ``quantize_dynamic``.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    graph = onnx.load(str(model))
    per_tensor = _per_tensor_matmuls(graph.graph, spec.per_tensor_matmuls)
    if spec.per_tensor_matmuls and not per_tensor:
        raise RecipeError(
            f"per_tensor_matmuls {spec.per_tensor_matmuls} match no MatMul node of the exported graph",
            hint="node names look like '/encoder/layer.0/attention/self/query/MatMul'",
        )
    config = DefaultWeightOnlyQuantConfig(
        block_size=spec.block_size, is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul",), bits=8
    )
    quantizer = MatMulNBitsQuantizer(
        graph, bits=8, block_size=spec.block_size, is_symmetric=True, accuracy_level=4,
        nodes_to_exclude=[*spec.exclude_nodes, *per_tensor], op_types_to_quantize=("MatMul",), algo_config=config,
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), False)
    return out


def _quantize(model: Path, spec: OnnxQuantization, out: Path, calibration_feeds: list[dict[str, np.ndarray]] | None) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    weight_type = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[spec.weight_type]
    # MatMulConstBOnly: quantize weight matmuls only, not activation x activation products.
    # DefaultTensorType: shape inference cannot type the outputs of ORT's fused contrib ops
    # (MultiHeadAttention, SkipLayerNormalization); they are float tensors.
    extra = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    operators = list(spec.operators)
    if spec.mode == "dynamic":
        if spec.block_size is not None and "MatMul" in operators:
            model = _quantize_blockwise(model, spec, out.with_suffix(".blockwise.onnx"))
            if not spec.per_tensor_matmuls:
                operators.remove("MatMul")
        if not operators:
            shutil.move(model, out)
            return
        quantize_dynamic(
            str(model), str(out), op_types_to_quantize=operators, per_channel=spec.per_channel,
            reduce_range=spec.reduce_range, weight_type=weight_type, nodes_to_exclude=spec.exclude_nodes, extra_options=extra,
        )
        return
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if spec.calibration.method == "percentile":
        extra["CalibPercentile"] = spec.calibration.percentile
    quantize_static(
        str(model), str(out), _CalibrationReader(calibration_feeds), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=operators, per_channel=spec.per_channel, reduce_range=spec.reduce_range,
        activation_type=QuantType.QUInt8, weight_type=weight_type, nodes_to_exclude=spec.exclude_nodes,
        calibrate_method=method[spec.calibration.method], extra_options=extra,
    )


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def validation_texts(job: ExportJob) -> list[str]:
    validation = job.recipe.validation
    texts = list(validation.samples)
    if validation.samples_file:
        texts += _read_lines(job.loaded.resolve(validation.samples_file))
    if not texts:
        raise RecipeError(f"{job.loaded.path}: validation has no samples", hint="add validation.samples or validation.samples_file")
    if TASKS[job.recipe.task].pairs:
        unpaired = next((text for text in texts if PAIR_SEPARATOR not in text), None)
        if unpaired is not None:
            raise RecipeError(f"{job.loaded.path}: a {job.recipe.task} validation sample has no tab between query and "
                              f"document: {unpaired[:80]!r}", hint="write each sample as: query<TAB>document")
    return texts


def model_inputs(task: str, texts: list[str]) -> list:
    """What the bundle's tokenizer is given for ``texts``: the texts, or (query, document) pairs of a pair task."""
    return [split_pair(text) for text in texts] if TASKS[task].pairs else texts


def pad_token(tokenizer_dir: Path) -> str | None:
    """The checkpoint's pad token, from the files transformers writes next to tokenizer.json."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tokenizer_dir / name
        if path.is_file():
            token = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token:
                return token
    return None


def _write_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    """The export's tokenizer with the checkpoint's padding in it, written without pretty-printing (a third fewer bytes).

    RoBERTa, XLM-R and DeBERTa pad with ids other than BERT's ``[PAD]``; the runtime pads as tokenizer.json says.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / TOKENIZER_FILE))
    token = pad_token(tokenizer_dir)
    if token is not None and tokenizer.token_to_id(token) is not None:
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(token), pad_token=token)
    tokenizer.save(str(out), pretty=False)


def labelled_examples(job: ExportJob) -> list[tuple[str, str]]:
    path = job.recipe.validation.labelled_file
    if path is None:
        return []
    rows = [json.loads(line) for line in job.loaded.resolve(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["text"], str(row["label"])) for row in rows]


def runtime_config(job: ExportJob, config: dict) -> RuntimeConfig:
    source = job.source.path
    pooling, normalize = "none", False
    if job.recipe.task == "feature-extraction":
        pooling, normalize = reference.sentence_pooling(source)
    max_length = job.recipe.max_length or reference.default_max_length(source, config)
    labels = []
    if job.recipe.task != "feature-extraction":
        id2label = config.get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)]
    return RuntimeConfig(max_length=max_length, pooling=pooling, normalize=normalize, labels=labels)


def build(job: ExportJob) -> BuildResult:
    target: OnnxTarget = job.target
    recipe = job.recipe
    source = job.source.path
    config = json.loads((source / "config.json").read_text())
    work = job.staging / ".work"
    work.mkdir()
    exported = _exported_once(job, config)
    job.progress(f"optimizing graph (level {target.optimization_level})")
    optimized = _optimize(exported, target.optimization_level, config, work / "optimized.onnx")
    runtime = runtime_config(job, config)
    _write_tokenizer(exported.parent, job.staging / TOKENIZER_FILE)
    texts = validation_texts(job)
    final = job.staging / MODEL_FILE
    if target.quantization is None:
        shutil.copy(optimized, final)
        quantization = "fp32"
    else:
        spec = target.quantization
        feeds = None
        if spec.mode == "static":
            calibration_texts = _read_lines(job.loaded.resolve(spec.calibration.samples_file)) if spec.calibration.samples_file else texts
            fp32 = EncoderModel(work, runtime, model_path=optimized, tokenizer_dir=exported.parent)
            feeds = [fp32.feeds(model_inputs(recipe.task, [t]))[0] for t in calibration_texts[: spec.calibration.max_samples]]
        job.progress(f"quantizing ({spec.label})")
        _quantize(optimized, spec, work / MODEL_FILE, feeds)
        shutil.move(work / MODEL_FILE, final)
        quantization = spec.label
    shutil.rmtree(work)
    job.progress("validating against the PyTorch reference")
    candidate = EncoderModel(job.staging, runtime)
    if ("reference", recipe.task) not in job.memo:
        job.memo["reference", recipe.task] = reference.load_reference(source, recipe.task)
    metrics = reference.compare(job.memo["reference", recipe.task], recipe.task, runtime, candidate, texts, labelled_examples(job))
    import onnx

    model = onnx.load(str(final), load_external_data=False)
    return BuildResult(
        quantization=quantization,
        parameters=reference.parameter_count(source),
        runtime=runtime.model_copy(update={"input_names": candidate.input_names}),
        metrics=metrics,
        tools=reference.tool_versions(*ONNX.build_tools),
        onnx=OnnxFacts(
            opset=max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            optimization_level=target.optimization_level,
            initializer_bytes=sum(int(np.prod(t.dims)) * _itemsize(t.data_type) for t in model.graph.initializer),
            n_layer=config.get("num_hidden_layers"),
            hidden_size=config.get("hidden_size"),
        ),
    )


def _itemsize(data_type: int) -> int:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
