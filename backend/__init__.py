"""The reference backend: the consumer (``cabinet-consumer``), backend key generation and
document signing. It is not part of the edge daemon: the agent never imports it; it imports the
agent's wire formats (``agent.privacy``) because those are the contract both sides speak."""
