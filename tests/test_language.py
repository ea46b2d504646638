import numpy as np

from fastlaion.language import EN, MULTI, NOLANG, LanguageIdentifier


def test_real_lid176_identifies_captions_and_splits_like_laion():
    lid = LanguageIdentifier(min_score=0.5)
    texts = ["a photograph of a cat sleeping on a sofa", "une photo d'un chat qui dort sur un canapé",
             "ein Foto einer Katze, die auf einem Sofa schläft", "una foto de un gato durmiendo en el sofá",
             "猫がソファで寝ている写真", "cat", "", None, "12345 67890 !!!", "line one\nline two in english"]
    langs, scores, groups = lid(texts)
    assert langs[:5] == ["en", "fr", "de", "es", "ja"]
    assert groups[:5] == [EN, MULTI, MULTI, MULTI, MULTI]
    assert (scores[:5] > 0.5).all()
    assert langs[5:8] == [None, None, None] and groups[5:8] == [NOLANG] * 3  # under 5 characters
    assert np.isnan(scores[5:8]).all()
    assert groups[8] == NOLANG  # digits: identified with a low probability
    assert langs[9] == "en"  # newlines do not break fastText


def test_threshold_moves_rows_to_nolang():
    texts = ["a photograph of a cat sleeping on a sofa"] * 3
    assert LanguageIdentifier(min_score=1.01)(texts)[2] == [NOLANG] * 3
