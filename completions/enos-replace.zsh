#compdef enos-replace

_enos-replace() {
  local context state state_descr line
  typeset -A opt_args

  local -a options=(
    {-h,--help}"[Show this help and exit]"
    "--version[Print the version and exit]"
  )
  _arguments -s -S \
    $options \
    ": :_enos-replace_cmds" \
    "*:: :->args" \
    && return 0

  case $words[1] in
    device)
      options=(
        $options
        {-h,--help}"[Show this help and exit]"
        "--asset-id[The device's assetId]: :_files"
        "--product-key[The device's productKey (with --device-key)]: :_files"
        "--device-key[The device's current deviceKey (with --product-key)]: :_files"
        "--new-key[The new hardware's deviceKey (4-64 of A-Z a-z 0-9 - _ .)]: :_files"
        "--no-secret[Do not request the new deviceSecret (the device will need dynamic activation)]"
        "--out[Write the provisioning record (with the secret) to this new file, mode 0600]: :_files"
        "--format[Record format\: json (default), env or text]: :(json env text)"
        "--overwrite[Allow --out to replace an existing file]"
        "--wait-active[Then wait up to this many seconds for the new hardware to come online]: :_files"
        "--dry-run[Run the preflight and show the signed requests; change nothing]"
        {-y,--yes}"[Do not ask for confirmation]"
        "--skip-free-check[Do not search that the new key is free before replacing]"
        "--max-attempts[Replace attempts in all when the outcome is unknown (default 3)]: :_files"
        "--max-retry-after[The longest Retry-After (s) honoured when throttled (default 300)]: :_files"
        "--finish[The device was replaced before (it has the new key)\: do what is left (secret, certificate, gateway link, tags) without replacing again; refused when the device does not have the new key]"
        "--no-gateway-check[Do not ask for the device's gateway (a sub-device's link is then not checked)]"
        "--csr[The new unit's certificate signing request (PEM)\: after the replace, the old unit's certificates are revoked and one is issued for it, into --out]: :_files"
        "--cert-days[The new certificate's validity in days (default 730)]: :_files"
        "--no-cert-check[Do not list the device's certificates (a valid one then does not stop the replace)]"
        "*--tag[Stamp the asset with a tag after the replace (repeatable)\: NAME=VALUE]: :_files"
        "--stamp[Also tag replacedAt (UTC) and replacedFrom (the old key), to find the swap later]"
        "--json[Print one JSON document on stdout]"
        "--show-secret[Also print the new deviceSecret (default\: only into --out)]"
        "--profile[Profile (section) of the profile file]: :_files"
        "--endpoint[API gateway URL, e.g]: :_files"
        "--access-key[Application access key (appKey)]: :_files"
        "--secret-key[Application secret key]: :_files"
        "--org-id[Organization (OU) id]: :_files"
        "--private-key-file[The application's RSA private key (PKCS#8 PEM), to decrypt secrets]: :_files"
        "--ca-file[CA certificates (PEM) to verify the gateway with]: :_files"
        "--api-version[v2.4 (default; encrypted secrets) or v2.1 (clear secrets)]: :(v2.4 v2.1)"
        "--timeout[Per-request timeout in seconds (default 30)]: :_files"
      )
      _arguments -s -S \
        $options \
        && return 0
      ;;

    batch)
      options=(
        $options
        {-h,--help}"[Show this help and exit]"
        "--concurrency[Rows in flight at once (default 8)]: :_files"
        "--qps[At most this many requests per second (default\: no cap)]: :_files"
        "--out[Credentials file (0600; .csv or .jsonl), written as rows complete]: :_files"
        "--journal[Journal file (default PLAN.journal)\: makes the batch resumable]: :_files"
        "--results[Results file (default\: the journal's name with .journal replaced by .results.csv)\: every row's outcome]: :_files"
        "--resume[Continue the batch of --journal\: skip done rows, reconcile rows that were in flight]"
        "--reverify[With --resume\: read every row the journal says is done back from the platform and trust only what it shows (for a plan that changed since the journal began, or a journal in doubt)]"
        "--check[Only check the plan (every row, duplicates); send nothing]"
        "--dry-run[Check the plan, then look every row up on the platform in bulk (about two calls per 100 rows) and list the rows that would fail; change nothing]"
        "--read-batch[Rows read in one bulk call (Search Device) by the preflight, the verification and --dry-run (1-200, default 100)]: :_files"
        "--max-retry-after[The longest Retry-After (s) the batch honours when throttled (default 300)]: :_files"
        "--wait-active[After the batch, watch its replaced devices (as \`enos-replace watch\` does) until they are online, at most this many seconds; exit 7 if some are not]: :_files"
        "--no-secret[Do not request the new deviceSecrets]"
        {-y,--yes}"[Do not ask for confirmation]"
        "--json[Print the summary as one JSON document on stdout]"
        "--subdevices[Ask each device's gateway (Get Gateway\: one more call per device), restore a link the replace dropped, name the gateway in the credentials and write one file per gateway of its sub-devices' new triples]"
        "--check-certificates[List each row's certificates (one more call per device)\: a row with valid ones and no csr is refused]"
        "--cert-days[Validity in days of the certificates issued for the plan's csr column (default 730)]: :_files"
        "*--tag[Stamp each replaced asset with a tag (repeatable)\: NAME=VALUE]: :_files"
        "--stamp[Also tag replacedAt (UTC) and replacedFrom (the old key)]"
        "--profile[Profile (section) of the profile file]: :_files"
        "--endpoint[API gateway URL, e.g]: :_files"
        "--access-key[Application access key (appKey)]: :_files"
        "--secret-key[Application secret key]: :_files"
        "--org-id[Organization (OU) id]: :_files"
        "--private-key-file[The application's RSA private key (PKCS#8 PEM), to decrypt secrets]: :_files"
        "--ca-file[CA certificates (PEM) to verify the gateway with]: :_files"
        "--api-version[v2.4 (default; encrypted secrets) or v2.1 (clear secrets)]: :(v2.4 v2.1)"
        "--timeout[Per-request timeout in seconds (default 30)]: :_files"
      )
      _arguments -s -S \
        $options \
        ": :_files" \
        && return 0
      ;;

    watch)
      options=(
        $options
        {-h,--help}"[Show this help and exit]"
        "--wait[Stop after this many seconds (default 3600)]: :_files"
        "--interval[Seconds between polls (default 10)]: :_files"
        "--by[Count by this column of the plan or results file (e.g]: :_files"
        "--qps[At most this many requests per second (default\: no cap)]: :_files"
        "--json[JSON Lines on stdout\: one object a poll, the last one with \"final\"\: true]"
        "--profile[Profile (section) of the profile file]: :_files"
        "--endpoint[API gateway URL, e.g]: :_files"
        "--access-key[Application access key (appKey)]: :_files"
        "--secret-key[Application secret key]: :_files"
        "--org-id[Organization (OU) id]: :_files"
        "--private-key-file[The application's RSA private key (PKCS#8 PEM), to decrypt secrets]: :_files"
        "--ca-file[CA certificates (PEM) to verify the gateway with]: :_files"
        "--api-version[v2.4 (default; encrypted secrets) or v2.1 (clear secrets)]: :(v2.4 v2.1)"
        "--timeout[Per-request timeout in seconds (default 30)]: :_files"
      )
      _arguments -s -S \
        $options \
        ": :_files" \
        && return 0
      ;;

    audit)
      options=(
        $options
        {-h,--help}"[Show this help and exit]"
        "--platform[Also search the platform\: inactive devices with the replacedAt tag (one call a page of 200)]"
        "--min-age[Only devices replaced at least this many seconds ago]: :_files"
        "--json[JSON Lines on stdout\: one object a device]"
        "--profile[Profile (section) of the profile file]: :_files"
        "--endpoint[API gateway URL, e.g]: :_files"
        "--access-key[Application access key (appKey)]: :_files"
        "--secret-key[Application secret key]: :_files"
        "--org-id[Organization (OU) id]: :_files"
        "--private-key-file[The application's RSA private key (PKCS#8 PEM), to decrypt secrets]: :_files"
        "--ca-file[CA certificates (PEM) to verify the gateway with]: :_files"
        "--api-version[v2.4 (default; encrypted secrets) or v2.1 (clear secrets)]: :(v2.4 v2.1)"
        "--timeout[Per-request timeout in seconds (default 30)]: :_files"
      )
      _arguments -s -S \
        $options \
        "*: :_files" \
        && return 0
      ;;

    get)
      options=(
        $options
        {-h,--help}"[Show this help and exit]"
        "--asset-id[The device's assetId]: :_files"
        "--product-key[The device's productKey (with --device-key)]: :_files"
        "--device-key[The device's current deviceKey (with --product-key)]: :_files"
        "--secret[Request the deviceSecret (decrypted with --private-key-file on V2.4)]"
        "--out[Write the record with the secret to this new file, mode 0600]: :_files"
        "--format[Record format\: json (default), env or text]: :(json env text)"
        "--overwrite[Allow --out to replace an existing file]"
        "--show-secret[Print the secret on stdout]"
        "--json[Print one JSON document on stdout]"
        "--profile[Profile (section) of the profile file]: :_files"
        "--endpoint[API gateway URL, e.g]: :_files"
        "--access-key[Application access key (appKey)]: :_files"
        "--secret-key[Application secret key]: :_files"
        "--org-id[Organization (OU) id]: :_files"
        "--private-key-file[The application's RSA private key (PKCS#8 PEM), to decrypt secrets]: :_files"
        "--ca-file[CA certificates (PEM) to verify the gateway with]: :_files"
        "--api-version[v2.4 (default; encrypted secrets) or v2.1 (clear secrets)]: :(v2.4 v2.1)"
        "--timeout[Per-request timeout in seconds (default 30)]: :_files"
      )
      _arguments -s -S \
        $options \
        && return 0
      ;;

    config)
      options=(
        $options
        {-h,--help}"[Show this help and exit]"
        "--json[Print one JSON document on stdout]"
        "--profile[Profile (section) of the profile file]: :_files"
        "--endpoint[API gateway URL, e.g]: :_files"
        "--access-key[Application access key (appKey)]: :_files"
        "--secret-key[Application secret key]: :_files"
        "--org-id[Organization (OU) id]: :_files"
        "--private-key-file[The application's RSA private key (PKCS#8 PEM), to decrypt secrets]: :_files"
        "--ca-file[CA certificates (PEM) to verify the gateway with]: :_files"
        "--api-version[v2.4 (default; encrypted secrets) or v2.1 (clear secrets)]: :(v2.4 v2.1)"
        "--timeout[Per-request timeout in seconds (default 30)]: :_files"
      )
      _arguments -s -S \
        $options \
        && return 0
      ;;

    help)
      options=(
        $options
        {-h,--help}"[Show this help and exit]"
      )
      _arguments -s -S \
        $options \
        ": :(device batch watch audit get config completion help)" \
        && return 0
      ;;

    completion)
      options=(
        $options
        {-h,--help}"[Show this help and exit]"
      )
      _arguments -s -S \
        $options \
        ": :(bash zsh fish)" \
        && return 0
      ;;

  esac

  return 1
}

_enos-replace_cmds() {
  local -a commands=(
    "device:Replace a device's key: the new hardware gets the asset, its data and a new secret"
    "batch:Replace many devices from a plan (CSV or JSON Lines), concurrently and resumably"
    "watch:Watch replaced devices come online: a batch's journal or results file, or a plan"
    "audit:List the devices replaced but not online since, with their age: from batch journals and, with --platform, from the platform's devices tagged replacedAt (--stamp)"
    "get:Show a device (and, with --secret, its current deviceSecret)"
    "config:Show the resolved configuration and the source of each value (secrets masked)"
    "help:Show the help of enos-replace or of one command (\`enos-replace help batch\`)"
    "completion:Print a shell completion script: bash, zsh or fish"
  )
  _describe "command" commands
}

_enos-replace
