"""The functions lowered graphs call: collectives, redistribution, random streams."""
