"""The round kit: everything one decentralized round needs, whatever the runtime."""
