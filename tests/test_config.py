import pytest

from diffusers_memcontrol.errors import InputError
from diffusers_memcontrol.train import check_inputs, parse_args
from diffusers_memcontrol.trainer.config import DEFAULT_LR, parse_learning_rates


def test_parse_learning_rates_reads_each_method_and_refuses_unknown_methods_and_bad_rates():
    assert parse_learning_rates("svdiff=3e-2, full=1e-3") == {"svdiff": 3e-2, "full": 1e-3}
    for bad in ("svdif=1e-2", "svdiff=0", "svdiff=-1", "svdiff", "svdiff=nan", "svdiff=fast"):
        with pytest.raises(Exception, match="METHOD=RATE"):
            parse_learning_rates(bad)
    with pytest.raises(InputError, match="--learning_rates"):
        parse_args(["--learning_rates", "svdif=1e-2"])


@pytest.mark.parametrize("extra, method, expected", [
    (["--learning_rates", "svdiff=3e-2,full=2e-3"], "svdiff", 3e-2),  # the method's own rate
    (["--learning_rates", "full=2e-3"], "svdiff", DEFAULT_LR["svdiff"]),  # not listed: the built-in default
    (["--learning_rates", "svdiff=3e-2", "--learning_rate", "5e-4"], "svdiff", 5e-4),  # --learning_rate wins
])
def test_the_trainer_uses_the_methods_rate_from_learning_rates(tmp_path, extra, method, expected):
    args = parse_args(["--peft_method", method, "--output_dir", str(tmp_path), "--max_train_samples", "8", *extra])
    assert check_inputs(args).config.learning_rate == pytest.approx(expected)


def test_the_cliques_memorization_objective_needs_generations_and_trials_keep_them():
    from diffusers_memcontrol.evaluation.config import EvaluationConfig
    from diffusers_memcontrol.trainer.arguments import evaluation_config, parse_args

    with pytest.raises(ValueError, match=r"search_memorization 'cliques' needs extraction_generations >= 2"):
        EvaluationConfig(search_memorization="cliques", extraction_generations=1)
    with pytest.raises(ValueError, match=r"search_memorization must be one of \('dmem', 'cliques'\), got 'fid'"):
        EvaluationConfig(search_memorization="fid")
    trial = ["--output_dir", "unused", "--eval_preset", "search", "--eval_extraction_generations", "6"]
    assert evaluation_config(parse_args(trial), "digits").extraction_generations == 0  # d_mem: no generations
    cliques = evaluation_config(parse_args([*trial, "--search_memorization_objective", "cliques"]), "digits")
    assert cliques.search_memorization == "cliques" and cliques.extraction_generations == 6
