function decodeUplink(input) { throw new Error("cannot read byte " + input.bytes.length); }
