"""`saelab dark-matter`: what SAEs fail to reconstruct, the experiments of "Decomposing The Dark Matter of Sparse
Autoencoders" on a width sweep of SAEs (`run`), with their analyses, regressions, gradient pursuit and report."""
