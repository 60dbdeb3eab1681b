"""ThingMagic/JADAK Mercury serial UHF readers (M6e, M6e Nano, M6e Micro)."""
