-- A held IPN keeps the message-contract headers its later processing needs besides its body:
-- whose notification it is (x-ipn-provider), the request headers that travelled with it
-- (x-ipn-http-*, e.g. WeChat Pay's signature) and x-ipn-rerouted-from. A JSON object of header
-- name to base64 value (text: the values are bytes). NULL on rows held before this migration:
-- they were PayPal IPNs, which need none of these.
ALTER TABLE ipn_held ADD COLUMN contract_headers text;
