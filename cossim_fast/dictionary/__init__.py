"""The class-wise source feature dictionary."""

from cossim_fast.dictionary.feature_dictionary import FeatureDictionary

__all__ = ["FeatureDictionary"]
