"""The shipped default model and its card (installed as package data ``pneumoflag.models``)."""
