"""Applications of metagradient descent (Engstrom et al., arXiv 2503.13751): LR schedules, data
selection, data poisoning, and the metasmoothness diagnostic."""
