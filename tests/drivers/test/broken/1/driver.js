function decodeUplink(input) { return { data: 
