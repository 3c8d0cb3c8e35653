// Test codec: byte 0 is a temperature in °C (signed), byte 1 a humidity in %.
function decodeUplink(input) {
  if (input.bytes.length < 2) {
    return { errors: ["expected 2 bytes"] };
  }
  var t = input.bytes[0] > 127 ? input.bytes[0] - 256 : input.bytes[0];
  return {
    data: { temperature: t, humidity: input.bytes[1], port: input.fPort,
            year: input.recvTime.getUTCFullYear() },
    warnings: []
  };
}
function encodeDownlink(input) {
  return { bytes: [input.data.interval & 255], fPort: input.fPort || 10, errors: [] };
}
