# examples/hello-plugin/src/ivshmem_hello/hello.py
import argparse

from peers.plugin import Guest, Pair, Plugin


class HelloPlugin(Plugin):
    description = "two peers greet each other through the shared memory, then finish"
    pairing = True  # its peers work in pairs (ivshmemctl up wants an even number of them)

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--text", default="hello", help="what to say (default hello)")

    def start(self, guest: Guest) -> None:
        super().start(guest)
        guest.enable_msix()  # what a driver does at probe time
        guest.find_partner(size=4096)  # a peer running this plugin, and a page for the two

    def paired(self, pair: Pair) -> None:  # the partner is found: pair.partner, pair.region
        self.pair = pair
        if pair.leader:  # it waited for us: it speaks first
            self.say(f"{self.options.text} from peer {self.guest.peer_id}")

    def say(self, text: str) -> None:
        self.guest.write_shm(self.pair.region.offset, text.encode() + b"\0")
        self.guest.ring(self.pair.partner, vector=0)  # the Doorbell register

    def heard(self) -> str:
        return self.guest.read_shm(self.pair.region.offset, 256).split(b"\0")[0].decode()

    def interrupt(self, vector: int) -> None:  # our partner rang (an MSI-X vector)
        text = self.heard()
        if self.pair.leader:  # the answer to our greeting: done
            self.guest.finish(f"hello: peer {self.pair.partner} answered {text!r}")
        else:  # a greeting: answer it, and done
            self.say(f"{text}, and hello back from peer {self.guest.peer_id}")
            self.guest.finish(f"hello: peer {self.pair.partner} said {text!r}")
