{{/* Names, labels and shared snippets. */}}

{{- define "ps.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's prefix for every object (release name, unless it already holds the chart name). */}}
{{- define "ps.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ps.coordinator" -}}{{ include "ps.fullname" . }}-coordinator{{- end -}}
{{- define "ps.gameserver" -}}{{ include "ps.fullname" . }}-game-server{{- end -}}
{{- define "ps.secret" -}}{{ default (printf "%s-secrets" (include "ps.fullname" .)) .Values.secrets.existingSecret }}{{- end -}}

{{- define "ps.labels" -}}
app.kubernetes.io/name: {{ include "ps.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "coordinator"). */}}
{{- define "ps.selector" -}}
app.kubernetes.io/name: {{ include "ps.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ps.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag -}}
{{- if and (eq .name "game-server") .ctx.Values.image.gameServerTag -}}
{{- $tag = .ctx.Values.image.gameServerTag -}}
{{- end -}}
{{- printf "%s/%s:%s" .ctx.Values.image.registry .name $tag -}}
{{- end -}}

{{/* The pod security context of the infrastructure design. */}}
{{- define "ps.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ps.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The coordinator replicas' gRPC endpoints, for game servers. */}}
{{- define "ps.coordinatorEndpoints" -}}
{{- $c := include "ps.coordinator" . -}}
{{- $ns := .Release.Namespace -}}
{{- $out := list -}}
{{- range $i := until (int .Values.coordinator.replicas) -}}
{{- $out = append $out (printf "http://%s-%d.%s-headless.%s.svc:9090" $c $i $c $ns) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* Every coordinator replica's Raft address: id=URL, ids from 1. */}}
{{- define "ps.raftPeers" -}}
{{- $c := include "ps.coordinator" . -}}
{{- $ns := .Release.Namespace -}}
{{- $out := list -}}
{{- range $i := until (int .Values.coordinator.replicas) -}}
{{- $out = append $out (printf "%d=http://%s-%d.%s-headless.%s.svc:7946" (add $i 1) $c $i $c $ns) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* Storage and cache environment shared by both binaries. */}}
{{- define "ps.storeEnv" -}}
- name: PS_CLUSTER
  value: {{ .Values.cluster | quote }}
- name: PS_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ps.secret" . }}
      key: database-url
{{- if .Values.database.caSecret }}
- name: PS_DATABASE_CA_FILE
  value: /etc/planetary/db-ca/ca.crt
{{- end }}
- name: PS_DB_POOL_SIZE
  value: {{ .Values.database.poolSize | quote }}
- name: PS_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ps.secret" . }}
      key: redis-url
      optional: true
- name: PS_LOG_FORMAT
  value: json
{{- end -}}

{{/* The database URL: the external one, or the bundled CockroachDB's. */}}
{{- define "ps.databaseUrl" -}}
{{- if .Values.cockroachdb.enabled -}}
{{- printf "postgresql://root@%s-cockroachdb-public.%s.svc:26257/%s?sslmode=disable" (include "ps.fullname" .) .Release.Namespace .Values.database.name -}}
{{- else -}}
{{- required "database.url is required when cockroachdb.enabled is false (or put database-url in secrets.existingSecret)" .Values.database.url -}}
{{- end -}}
{{- end -}}

{{/* The Redis URL: the external one, the bundled Redis's master, or none. */}}
{{- define "ps.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- $n := printf "%s-redis" (include "ps.fullname" .) -}}
{{- $hosts := list -}}
{{- range $i := until (int .Values.redis.replicas) -}}
{{- $hosts = append $hosts (printf "%s-%d.%s.%s.svc:26379" $n $i $n $.Release.Namespace) -}}
{{- end -}}
{{- printf "redis+sentinel://%s/%s" (join "," $hosts) .Values.redis.masterName -}}
{{- else -}}
{{- .Values.redisUrl | default "" -}}
{{- end -}}
{{- end -}}

{{/* The storage class of the chart's volumes ("" : the cluster default). */}}
{{- define "ps.storageClassName" -}}
{{- if .Values.storageClass.create -}}
{{- .Values.storageClass.name -}}
{{- else -}}
{{- .Values.storageClass.existing | default "" -}}
{{- end -}}
{{- end -}}

{{/* Egress to the database (26257) and Redis (6379): the bundled pods, or
     the external CIDRs of networkPolicies.externalStoreCIDRs. */}}
{{- define "ps.storeEgress" -}}
- to:
    {{- if .Values.cockroachdb.enabled }}
    - podSelector:
        matchLabels:
          {{- include "ps.selector" (dict "ctx" . "component" "cockroachdb") | nindent 10 }}
    {{- end }}
    {{- range .Values.networkPolicies.externalStoreCIDRs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    - { port: 26257, protocol: TCP }
- to:
    {{- if .Values.redis.enabled }}
    - podSelector:
        matchLabels:
          {{- include "ps.selector" (dict "ctx" . "component" "redis") | nindent 10 }}
    {{- end }}
    {{- range .Values.networkPolicies.externalStoreCIDRs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    - { port: 6379, protocol: TCP }
    - { port: 26379, protocol: TCP }
{{- end -}}

{{- define "ps.dnsEgress" -}}
- to:
    - namespaceSelector: {}
  ports:
    - { port: 53, protocol: UDP }
    - { port: 53, protocol: TCP }
{{- end -}}

{{/* Fails unless the quantity .size (Mi, Gi or Ti) is at least .min GiB:
     (dict "size" "50Gi" "min" 10 "what" "gameServer.storage" "why" "…"). */}}
{{- define "ps.atLeastGi" -}}
{{- $n := regexFind "^[0-9]+" .size | int -}}
{{- $gi := $n -}}
{{- if hasSuffix "Mi" .size }}{{ $gi = div $n 1024 }}{{ end -}}
{{- if hasSuffix "Ti" .size }}{{ $gi = mul $n 1024 }}{{ end -}}
{{- if lt $gi (int .min) -}}
{{- fail (printf "%s is %s: at least %dGi is needed (%s)" .what .size (int .min) .why) -}}
{{- end -}}
{{- end -}}

{{/* CPU cores of a quantity ("4", "1500m"). */}}
{{- define "ps.cores" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}
{{- divf (trimSuffix "m" $q | float64) 1000.0 -}}
{{- else -}}
{{- $q | float64 -}}
{{- end -}}
{{- end -}}
