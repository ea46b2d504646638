"""The part of a Common Crawl WAT record that `fastlaion extract` reads, as msgspec types.

msgspec decodes only these fields and skips the rest of the record unbuilt (it still checks the
JSON syntax of what it skips), which is about twice as fast as building the whole document. The
types are as loose as the checks of the reference path in extract.py (`Any` wherever that path
tests the type itself), so a record decodes here exactly when the reference path would read the
same values from it; a field of another shape raises, and the record goes to the reference path.
"""

from typing import Any

import msgspec


class WatLink(msgspec.Struct, gc=False):
    path: Any = None
    url: Any = None
    alt: Any = None


class WatHead(msgspec.Struct, gc=False):
    Base: Any = None
    Metas: Any = None


class WatHtmlMeta(msgspec.Struct, gc=False):
    Links: list[WatLink] | None = None
    Head: WatHead | None = None


class WatResponseMeta(msgspec.Struct, gc=False):
    html: WatHtmlMeta | None = msgspec.field(default=None, name="HTML-Metadata")
    Headers: Any = None


class WatPayloadMeta(msgspec.Struct, gc=False):
    response: WatResponseMeta | None = msgspec.field(default=None, name="HTTP-Response-Metadata")


class WatHeaderMeta(msgspec.Struct, gc=False):
    target_uri: Any = msgspec.field(default=None, name="WARC-Target-URI")


class WatEnvelope(msgspec.Struct, gc=False):
    payload: WatPayloadMeta | None = msgspec.field(default=None, name="Payload-Metadata")
    header: WatHeaderMeta | None = msgspec.field(default=None, name="WARC-Header-Metadata")


class WatDoc(msgspec.Struct, gc=False):
    Envelope: WatEnvelope | None = None


DECODER = msgspec.json.Decoder(WatDoc)
