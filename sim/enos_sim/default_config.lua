-- Default configuration of enos-sim. A user config (Lua file returning a table, or a JSON file)
-- is merged over this one: maps merge key by key, lists (apps, orgs, products, devices) replace.
return {
  apps = {
    {
      access_key = "sim-access-key",
      secret_key = "sim-secret-key",
      -- public_key = "-----BEGIN PUBLIC KEY-----…", or public_key_file = "/path/app_pub.pem";
      -- without one, requireSecret answers 11858 for this app.
      -- orgs = { "o15724268424841" },  -- orgs the app may use; absent = every org
    },
  },
  orgs = { "o15724268424841" },
  products = {
    {
      productKey = "pk_demo",
      productName = { defaultValue = "Demo product", i18nValue = { en_US = "Demo product" } },
      productType = "Device",
      modelId = "demo_model",
    },
    {
      productKey = "pk_gateway",
      productName = { defaultValue = "Demo gateway", i18nValue = { en_US = "Demo gateway" } },
      productType = "Gateway",
      modelId = "demo_gateway_model",
    },
  },
  devices = {},            -- seed devices: { productKey=…, deviceKey=…, [assetId, deviceSecret, orgId, status, gateway=assetId] }
  token_ttl = 7200,        -- seconds
  clock_skew_ms = 300000,  -- accepted |server time - apim-timestamp|
  secret_scheme = "enos-v2.4",
  login = { max_attempts = 4, window_s = 120, block_s = 300 },
  max_devices_per_product = 10000,
  log_size = 2000,         -- request log ring buffer entries
}
